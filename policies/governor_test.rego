# Tests of governor approval: sensitive actions, the Governor, approvals from policy data.
# Each rule is tested both ways; input fields are replaced one by one (rego-cpp limitation).
package plant.gateway.governor_test

import rego.v1

import data.plant.gateway.governor

now := 1767225600000000000

# rego-cpp 1.5 ignores `with ... as <rule>`: values given to `with` are function calls or locals.
at(offset) := now + offset

jwt(claims) := object.union({"user_id": "u-1", "roles": ["customer_admin"]}, claims)

approvals_until(expires) := {"ap-1": {"user_id": "u-1", "action": "delete_agent", "resource": "agents", "expires_ns": expires}}

test_every_sensitive_action_needs_approval if {
	governor.approval_required with input.jwt as jwt({}) with input.action as "delete_agent"
	governor.approval_required with input.jwt as jwt({}) with input.action as "update_billing"
	governor.approval_required with input.jwt as jwt({}) with input.action as "change_subscription"
	governor.approval_required with input.jwt as jwt({}) with input.action as "export_data"
	governor.approval_required with input.jwt as jwt({}) with input.action as "delete_customer"
}

test_ordinary_action_needs_no_approval if {
	not governor.approval_required with input.jwt as jwt({}) with input.action as "delete"
}

test_governor_needs_no_approval if {
	not governor.approval_required with input.jwt as jwt({"roles": ["admin"], "governor_agent_id": "gov-1"})
		with input.action as "delete_agent"
}

test_admin_without_governor_agent_needs_approval if {
	governor.approval_required with input.jwt as jwt({"roles": ["admin"]}) with input.action as "delete_agent"
}

test_governor_agent_without_admin_needs_approval if {
	governor.approval_required with input.jwt as jwt({"governor_agent_id": "gov-1"}) with input.action as "delete_agent"
}

test_empty_governor_agent_id_is_not_governor if {
	not governor.is_governor with input.jwt as jwt({"roles": ["admin"], "governor_agent_id": ""})
}

test_null_governor_agent_id_is_not_governor if {
	not governor.is_governor with input.jwt as jwt({"roles": ["admin"], "governor_agent_id": null})
}

test_valid_approval_passes if {
	not governor.approval_required with input.jwt as jwt({}) with input.action as "delete_agent"
		with input.resource as "agents" with input.approval as {"id": "ap-1"} with input.now_ns as at(0)
		with data.plant.config.approvals as approvals_until(at(60))
}

test_approval_for_other_user_refused if {
	governor.approval_required with input.jwt as jwt({"user_id": "u-2"}) with input.action as "delete_agent"
		with input.resource as "agents" with input.approval as {"id": "ap-1"} with input.now_ns as at(0)
		with data.plant.config.approvals as approvals_until(at(60))
}

test_approval_for_other_action_refused if {
	governor.approval_required with input.jwt as jwt({}) with input.action as "export_data"
		with input.resource as "agents" with input.approval as {"id": "ap-1"} with input.now_ns as at(0)
		with data.plant.config.approvals as approvals_until(at(60))
}

test_approval_for_other_resource_refused if {
	governor.approval_required with input.jwt as jwt({}) with input.action as "delete_agent"
		with input.resource as "customers" with input.approval as {"id": "ap-1"} with input.now_ns as at(0)
		with data.plant.config.approvals as approvals_until(at(60))
}

test_expired_approval_refused if {
	governor.approval_required with input.jwt as jwt({}) with input.action as "delete_agent"
		with input.resource as "agents" with input.approval as {"id": "ap-1"} with input.now_ns as now + 61
		with data.plant.config.approvals as approvals_until(at(60))
}

test_unknown_approval_refused if {
	governor.approval_required with input.jwt as jwt({}) with input.action as "delete_agent"
		with input.resource as "agents" with input.approval as {"id": "nope"} with input.now_ns as at(0)
		with data.plant.config.approvals as approvals_until(at(60))
}

test_approval_outcome if {
	o := governor.approval_outcome with input.jwt as jwt({"agent_id": "agent-7"}) with input.action as "export_data"
	o.status == 307
	o.kind == "governor-approval-required"
	o.redirect == {"action": "export_data", "agent_id": "agent-7"}
}

test_approval_outcome_without_agent if {
	o := governor.approval_outcome with input.jwt as jwt({}) with input.action as "export_data"
	o.redirect.agent_id == null
}

test_approval_used_sets_expiry if {
	e := governor.approval_expires_ns with input.jwt as jwt({}) with input.action as "delete_agent"
		with input.resource as "agents" with input.approval as {"id": "ap-1"} with input.now_ns as at(0)
		with data.plant.config.approvals as approvals_until(at(60))
	e == now + 60
}

# --- approvals verified with the platform (input.approval from the approvals API) ------------

record(fields) := object.union(
	{"id": "APR-1", "verified": true, "action": "export_data", "agent_id": "agent-1", "customer_id": "cust-1", "expires_ns": at(60)},
	fields,
)

pp_admin := {"user_id": "u-9", "roles": ["admin"], "governor_agent_id": null, "customer_id": null}

test_verified_record_passes_a_request_naming_no_agent if {
	governor.approval_used with input.jwt as pp_admin with input.action as "export_data"
		with input.resource as "audit" with input.approval as record({}) with input.now_ns as at(0)
	e := governor.approval_expires_ns with input.jwt as pp_admin with input.action as "export_data"
		with input.resource as "audit" with input.approval as record({}) with input.now_ns as at(0)
	e == now + 60
}

test_unverified_record_refused if {
	governor.approval_required with input.jwt as pp_admin with input.action as "export_data"
		with input.resource as "audit" with input.approval as record({"verified": false}) with input.now_ns as at(0)
}

test_record_fields_without_verified_refused if {
	governor.approval_required with input.jwt as pp_admin with input.action as "export_data"
		with input.resource as "audit" with input.approval as {"id": "APR-1", "action": "export_data"}
		with input.now_ns as at(0)
}

test_record_for_other_action_refused if {
	governor.approval_required with input.jwt as pp_admin with input.action as "export_data"
		with input.resource as "audit" with input.approval as record({"action": "delete_agent"}) with input.now_ns as at(0)
}

test_action_names_match_by_normalised_name_or_alias if {
	governor.action_matches with input.action as "export_data" with input.approval as record({"action": " Export-Data "})
	governor.action_matches with input.action as "export_data" with input.approval as record({"action": "export data"})
	governor.action_matches with input.action as "delete_agent" with input.approval as record({"action": "agent.delete"})
}

test_action_names_never_match_by_prefix if {
	not governor.action_matches with input.action as "delete_agent" with input.approval as record({"action": "delete"})
	not governor.action_matches with input.action as "export_data" with input.approval as record({"action": "export"})
	not governor.action_matches with input.action as "export_data" with input.approval as record({"action": "export_data_all"})
	not governor.action_matches with input.action as "export_data" with input.approval as record({"action": 7})
}

test_record_for_other_agent_refused if {
	governor.approval_required with input.jwt as pp_admin with input.action as "delete_agent"
		with input.resource as "agents" with input.resource_id as "agent-2"
		with input.approval as record({"action": "delete_agent"}) with input.now_ns as at(0)
}

test_record_for_this_agent_passes if {
	governor.approval_used with input.jwt as pp_admin with input.action as "delete_agent"
		with input.resource as "agents" with input.resource_id as "agent-1"
		with input.approval as record({"action": "delete_agent"}) with input.now_ns as at(0)
}

test_token_agent_must_match_the_record if {
	governor.agent_mismatch with input.jwt as object.union(pp_admin, {"agent_id": "agent-9"})
		with input.resource as "audit" with input.approval as record({})
	not governor.agent_mismatch with input.jwt as object.union(pp_admin, {"agent_id": "agent-1"})
		with input.resource as "audit" with input.approval as record({})
}

test_record_for_other_customer_refused if {
	governor.customer_mismatch with input.jwt as pp_admin with input.resource as "customers"
		with input.resource_id as "cust-2" with input.approval as record({})
	governor.customer_mismatch with input.jwt as object.union(pp_admin, {"customer_id": "cust-3"})
		with input.resource as "audit" with input.approval as record({})
	not governor.customer_mismatch with input.jwt as pp_admin with input.resource as "customers"
		with input.resource_id as "cust-1" with input.approval as record({})
}

test_expired_record_refused if {
	governor.approval_required with input.jwt as pp_admin with input.action as "export_data"
		with input.resource as "audit" with input.approval as record({}) with input.now_ns as at(60)
}

test_record_without_expiry_passes if {
	governor.approval_used with input.jwt as pp_admin with input.action as "export_data"
		with input.resource as "audit" with input.approval as record({"expires_ns": null}) with input.now_ns as at(0)
}
