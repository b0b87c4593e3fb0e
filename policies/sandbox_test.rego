# Tests of sandbox routing and of the agent budget hook.
# Each rule is tested both ways; input fields are replaced one by one (rego-cpp limitation).
package plant.gateway.sandbox_test

import rego.v1

import data.plant.gateway.budget
import data.plant.gateway.sandbox

jwt(claims) := object.union({"user_id": "u-1", "roles": ["user"]}, claims)

test_trial_goes_to_sandbox if {
	sandbox.target_backend == "sandbox" with input.jwt as jwt({"trial_mode": true})
}

test_paid_goes_to_production if {
	sandbox.target_backend == "production" with input.jwt as jwt({"trial_mode": false})
}

test_missing_trial_claim_goes_to_production if {
	sandbox.target_backend == "production" with input.jwt as jwt({})
}

test_budget_hook_charges_allowed if {
	h := budget.hook with input.jwt as jwt({"agent_id": "agent-1"}) with input.resource as "agents"
		with input.action as "read"
	h.charge == true
	h.agent_id == "agent-1"
	h.critical_agent == false
	h.governor == false
}

test_budget_hook_does_not_charge_denied if {
	h := budget.hook with input.jwt as jwt({"roles": ["nobody"]}) with input.resource as "agents"
		with input.action as "read"
	h.charge == false
	h.agent_id == null
}

test_critical_agent_from_data if {
	h := budget.hook with input.jwt as jwt({"agent_id": "agent-1"})
		with data.plant.config.critical_agents as ["agent-1"]
	h.critical_agent == true
}

test_governor_flagged_in_budget_hook if {
	h := budget.hook with input.jwt as jwt({"roles": ["admin"], "governor_agent_id": "gov-1"})
	h.governor == true
}
