# Tests of the entry point: order of checks, flags, obligations, cache validity, malformed input.
# rego-cpp 1.5 crashes on `with input as <object>`, so tests replace input fields one by one.
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

test_denied_decision_shape if {
	d := gateway.decision with input.jwt as paid(["readonly"])
		with input.resource as "agents" with input.action as "create" with input.now_ns as at(0)
	d.allow == false
	d.status == 403
	d.kind == "permission-denied"
	d.required_permission == "agents:create"
	d.obligations.budget.charge == false
}

test_empty_input_denied if {
	d := gateway.decision with input.now_ns as at(0)
	d.allow == false
	d.kind == "permission-denied"
}

test_missing_action_denied if {
	d := gateway.decision with input.jwt as paid(["admin"]) with input.resource as "agents"
	d.allow == false
}

test_non_string_resource_denied if {
	d := gateway.decision with input.jwt as paid(["admin"]) with input.resource as 7 with input.action as "read"
	d.allow == false
}

test_all_flags_off_still_needs_well_formed_input if {
	off := {"rbac": false, "trial_mode": false, "governor_approval": false, "sandbox_routing": false}
	d := gateway.decision with input.jwt as {} with input.flags as off
	d.allow == false
}

test_all_flags_off_allows_well_formed_input if {
	off := {"rbac": false, "trial_mode": false, "governor_approval": false, "sandbox_routing": false}
	d := gateway.decision with input.jwt as {} with input.flags as off
		with input.resource as "agents" with input.action as "delete_agent"
	d.allow == true
	d.policies == ["plant.gateway", "plant.gateway.budget"]
}

test_rbac_flag_off_skips_rbac if {
	d := gateway.decision with input.jwt as paid(["readonly"]) with input.flags as {"rbac": false}
		with input.resource as "agents" with input.action as "create"
	d.allow == true
	not "plant.gateway.rbac" in d.policies
}

test_rbac_flag_on_explicitly if {
	d := gateway.decision with input.jwt as paid(["readonly"]) with input.flags as {"rbac": true}
		with input.resource as "agents" with input.action as "create"
	d.allow == false
}

test_non_boolean_flag_counts_as_on if {
	d := gateway.decision with input.jwt as paid(["readonly"]) with input.flags as {"rbac": "no"}
		with input.resource as "agents" with input.action as "create"
	d.allow == false
}

test_expired_trial_wins_over_rbac if {
	d := gateway.decision with input.jwt as object.union(trial(now - 1), {"roles": ["bogus"]})
		with input.resource as "agents" with input.action as "manage" with input.now_ns as at(0)
	d.kind == "trial-expired"
	d.status == 403
}

test_trial_flag_off_ignores_expiry if {
	d := gateway.decision with input.jwt as trial(now - 1) with input.flags as {"trial_mode": false}
		with input.resource as "agents" with input.action as "read" with input.now_ns as at(0)
	d.allow == true
}

test_trial_blocked_resource_denied if {
	d := gateway.decision with input.jwt as trial(now + hour)
		with input.resource as "billing" with input.action as "read" with input.now_ns as at(0)
	d.allow == false
	d.kind == "permission-denied"
	d.required_permission == "paid_plan"
}

test_paid_user_reaches_billing if {
	d := gateway.decision with input.jwt as paid(["user"])
		with input.resource as "billing" with input.action as "read" with input.now_ns as at(0)
	d.allow == true
}

test_trial_task_counted if {
	d := gateway.decision with input.jwt as trial(now + hour)
		with input.resource as "tasks" with input.action as "create" with input.now_ns as at(0)
	d.allow == true
	d.obligations.count_trial_task == true
}

test_trial_read_not_counted if {
	d := gateway.decision with input.jwt as trial(now + hour)
		with input.resource as "tasks" with input.action as "read" with input.now_ns as at(0)
	d.obligations.count_trial_task == false
}

test_paid_task_not_counted if {
	d := gateway.decision with input.jwt as paid(["user"])
		with input.resource as "tasks" with input.action as "execute" with input.now_ns as at(0)
	d.allow == true
	d.obligations.count_trial_task == false
}

test_denied_trial_task_not_counted if {
	d := gateway.decision with input.jwt as object.union(trial(now + hour), {"roles": ["readonly"]})
		with input.resource as "tasks" with input.action as "create" with input.now_ns as at(0)
	d.allow == false
	d.obligations.count_trial_task == false
}

test_trial_decision_valid_until_expiry if {
	d := gateway.decision with input.jwt as trial(now + hour)
		with input.resource as "agents" with input.action as "read" with input.now_ns as at(0)
	d.valid_until_ns == now + hour
}

test_paid_decision_valid_forever if {
	d := gateway.decision with input.jwt as paid(["user"])
		with input.resource as "agents" with input.action as "read" with input.now_ns as at(0)
	d.valid_until_ns == null
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

test_governor_passes_sensitive_action if {
	d := gateway.decision with input.jwt as object.union(paid(["admin"]), {"governor_agent_id": "gov-1"})
		with input.resource as "agents" with input.action as "delete_agent" with input.now_ns as at(0)
	d.allow == true
}

test_governor_flag_off_skips_redirect if {
	d := gateway.decision with input.jwt as paid(["customer_admin"]) with input.flags as {"governor_approval": false}
		with input.resource as "agents" with input.action as "delete_agent" with input.now_ns as at(0)
	d.allow == true
}

test_approval_bounds_cache_validity if {
	approvals := {"ap-1": {"user_id": "u-1", "action": "export_data", "expires_ns": at(60)}}
	d := gateway.decision with input.jwt as paid(["customer_admin"]) with input.approval as {"id": "ap-1"}
		with input.resource as "customers" with input.action as "export_data" with input.now_ns as at(0)
		with data.plant.config.approvals as approvals
	d.allow == true
	d.valid_until_ns == now + 60
}

test_sandbox_flag_off_routes_trial_to_production if {
	d := gateway.decision with input.jwt as trial(now + hour) with input.flags as {"sandbox_routing": false}
		with input.resource as "agents" with input.action as "read" with input.now_ns as at(0)
	d.target_backend == "production"
}

test_trial_routed_to_sandbox if {
	d := gateway.decision with input.jwt as trial(now + hour)
		with input.resource as "agents" with input.action as "read" with input.now_ns as at(0)
	d.target_backend == "sandbox"
}
