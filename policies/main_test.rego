# Tests of the entry point: order of checks, flags, obligations, cache validity, malformed input.
# Few on purpose: rego-cpp compiles each `with` over the whole decision (seconds); the table-driven
# cases live in tests/e2e/test_policy_e2e.py, evaluated through the compiled bundle over HTTP.
package plant.gateway.main_test

import rego.v1

import data.plant.gateway

now := 1767225600000000000

# rego-cpp 1.5 ignores `with ... as <rule>`: values given to `with` are function calls or locals.
at(offset) := now + offset

hour := 3600000000000

paid(roles) := {"user_id": "u-1", "roles": roles, "trial_mode": false}

trial(expires) := {"user_id": "u-2", "roles": ["user"], "trial_mode": true, "trial_expires_ns": expires}

test_allowed_decision_shape if {
	d := gateway.decision with input.jwt as paid(["user"])
		with input.resource as "agents" with input.action as "read" with input.now_ns as at(0)
	d.allow == true
	d.status == 200
	d.kind == null
	d.target_backend == "production"
	d.resource == "agents"
	d.action == "read"
	d.obligations.budget.charge == true
	"plant.gateway.rbac" in d.policies
}

test_empty_input_denied if {
	d := gateway.decision with input.now_ns as at(0)
	d.allow == false
	d.kind == "permission-denied"
}

test_rbac_flag_off_skips_rbac if {
	d := gateway.decision with input.jwt as paid(["readonly"]) with input.flags as {"rbac": false}
		with input.resource as "agents" with input.action as "create"
	d.allow == true
	not "plant.gateway.rbac" in d.policies
}

test_expired_trial_wins_over_rbac if {
	d := gateway.decision with input.jwt as object.union(trial(now - 1), {"roles": ["bogus"]})
		with input.resource as "agents" with input.action as "manage" with input.now_ns as at(0)
	d.kind == "trial-expired"
	d.status == 403
}

test_trial_decision if {
	d := gateway.decision with input.jwt as trial(now + hour)
		with input.resource as "tasks" with input.action as "create" with input.now_ns as at(0)
	d.allow == true
	d.obligations.count_trial_task == true
	d.target_backend == "sandbox"
	d.valid_until_ns == now + hour
}

test_rbac_before_governor_redirect if {
	d := gateway.decision with input.jwt as paid(["user"])
		with input.resource as "agents" with input.action as "delete_agent" with input.now_ns as at(0)
	d.status == 403
	d.kind == "permission-denied"
}

test_governor_redirect_decision if {
	d := gateway.decision with input.jwt as paid(["customer_admin"])
		with input.resource as "agents" with input.action as "delete_agent" with input.now_ns as at(0)
	d.allow == false
	d.status == 307
	d.kind == "governor-approval-required"
	d.redirect.action == "delete_agent"
}

test_missing_action_denied if {
	d := gateway.decision with input.jwt as paid(["admin"]) with input.resource as "agents"
	d.allow == false
	d.reason == "the request names no resource or action"
}

test_flags_on_list_every_policy if {
	d := gateway.decision with input.jwt as paid(["user"]) with input.flags as {"rbac": true, "trial_mode": true}
		with input.resource as "agents" with input.action as "read"
	d.policies == ["plant.gateway", "plant.gateway.budget", "plant.gateway.governor", "plant.gateway.rbac", "plant.gateway.sandbox", "plant.gateway.trial"]
}

test_sandbox_flag_off_routes_to_production if {
	d := gateway.decision with input.jwt as trial(now + hour) with input.flags as {"sandbox_routing": false}
		with input.resource as "agents" with input.action as "read" with input.now_ns as at(0)
	d.target_backend == "production"
	d.policies == ["plant.gateway", "plant.gateway.budget", "plant.gateway.governor", "plant.gateway.rbac", "plant.gateway.trial"]
}

test_decision_says_when_it_relied_on_an_approval if {
	d := gateway.decision with input.jwt as paid(["admin"])
		with input.resource as "audit" with input.action as "export_data" with input.now_ns as at(0)
		with input.approval as {"id": "APR-1", "verified": true, "action": "export_data", "expires_ns": at(60)}
	d.allow == true
	d.approval_used == true
	d.approval_expires_ns == now + 60
	d.valid_until_ns == now + 60
}

test_decision_without_approval_used if {
	d := gateway.decision with input.jwt as paid(["admin"])
		with input.resource as "audit" with input.action as "export_data" with input.now_ns as at(0)
		with input.approval as {"id": "APR-1", "verified": false}
	d.status == 307
	d.approval_used == false
	d.approval_expires_ns == null
}
