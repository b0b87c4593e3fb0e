# Tests of trial mode: expiry, resources closed to trial users, what counts as a task.
# Each rule is tested both ways; input fields are replaced one by one (rego-cpp limitation).
package plant.gateway.trial_test

import rego.v1

import data.plant.gateway.trial

now := 1767225600000000000

# rego-cpp 1.5 ignores `with ... as <rule>`: values given to `with` are function calls or locals.
at(offset) := now + offset

jwt(trial_mode, expires) := {"user_id": "u-1", "roles": ["user"], "trial_mode": trial_mode, "trial_expires_ns": expires}

test_trial_user_is_trial if {
	trial.is_trial with input.jwt as jwt(true, now + 1)
}

test_paid_user_is_not_trial if {
	not trial.is_trial with input.jwt as jwt(false, null)
}

test_truthy_string_is_not_trial if {
	not trial.is_trial with input.jwt as jwt("true", null)
}

test_expired_trial if {
	trial.expired with input.jwt as jwt(true, now - 1) with input.now_ns as at(0)
}

test_expiry_instant_is_expired if {
	trial.expired with input.jwt as jwt(true, now) with input.now_ns as at(0)
}

test_unexpired_trial if {
	not trial.expired with input.jwt as jwt(true, now + 1) with input.now_ns as at(0)
}

test_trial_without_expiry_is_expired if {
	trial.expired with input.jwt as jwt(true, null) with input.now_ns as at(0)
}

test_paid_user_never_expired if {
	not trial.expired with input.jwt as jwt(false, now - 1) with input.now_ns as at(0)
}

test_clock_from_input if {
	trial.expired with input.jwt as jwt(true, now + 5) with input.now_ns as now + 10
	not trial.expired with input.jwt as jwt(true, now + 5) with input.now_ns as now + 1
}

test_trial_blocked_resources if {
	trial.blocked with input.jwt as jwt(true, now + 1) with input.resource as "billing"
	trial.blocked with input.jwt as jwt(true, now + 1) with input.resource as "invoices"
	trial.blocked with input.jwt as jwt(true, now + 1) with input.resource as "subscriptions"
}

test_trial_open_resources if {
	not trial.blocked with input.jwt as jwt(true, now + 1) with input.resource as "agents"
}

test_paid_user_not_blocked if {
	not trial.blocked with input.jwt as jwt(false, null) with input.resource as "billing"
}

test_blocked_outcome if {
	o := trial.blocked_outcome with input.jwt as jwt(true, now + 1) with input.resource as "invoices"
	o.status == 403
	o.kind == "permission-denied"
	o.required_permission == "paid_plan"
	o.reason == "trial accounts cannot access 'invoices'"
}

test_tasks_counted if {
	trial.counts_task with input.jwt as jwt(true, now + 1) with input.resource as "agents" with input.action as "create"
	trial.counts_task with input.jwt as jwt(true, now + 1) with input.resource as "agents" with input.action as "execute"
	trial.counts_task with input.jwt as jwt(true, now + 1) with input.resource as "tasks" with input.action as "create"
	trial.counts_task with input.jwt as jwt(true, now + 1) with input.resource as "tasks" with input.action as "execute"
}

test_reads_not_counted if {
	not trial.counts_task with input.jwt as jwt(true, now + 1) with input.resource as "tasks" with input.action as "read"
}

test_other_resources_not_counted if {
	not trial.counts_task with input.jwt as jwt(true, now + 1) with input.resource as "customers" with input.action as "create"
}

test_paid_not_counted if {
	not trial.counts_task with input.jwt as jwt(false, null) with input.resource as "tasks" with input.action as "create"
}
