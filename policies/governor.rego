# Plant Gateway governor approval: sensitive actions need the Governor or a valid approval.
# The request names an approval in input.approval.id (header X-Approval-ID or X-Governor-Approval-ID,
# or a JSON body's top-level approval_id); it is valid from one of two sources:
# - policy data: data.plant.config.approvals[id] (names the user, action, resource and expiry);
# - the platform's approvals API (APPROVALS_URL): the gateway fetched the record with the caller's
#   token and passes it as input.approval {id, verified: true, action, agent_id, customer_id,
#   expires_ns} (verified: false when the platform does not know the id). Only these rules judge it.
# An approval that lets a request through is consumed by the gateway (decision approval_used).
package plant.gateway.governor

import rego.v1

import data.plant.gateway.common


sensitive if input.action in data.plant.config.sensitive_actions

# The Governor is an admin that carries a governor_agent_id claim.
is_governor if {
	data.plant.config.governor_role in common.roles
	common.governor_agent_id != null
	common.governor_agent_id != ""
}

approval := data.plant.config.approvals[input.approval.id]

# A static approval names this user and this action and has not expired.
valid_static_approval if {
	approval.user_id == input.jwt.user_id
	approval.action == input.action
	object.get(approval, "resource", input.resource) == input.resource
	approval.expires_ns > common.now_ns
}

# A platform record is valid for this request when the platform knows it (verified), its action
# names this action, the agent and customer it names are those the request names (when the
# request names one), and it has not expired (a record without expires_ns does not expire).
valid_verified_approval if {
	input.approval.verified == true
	action_matches
	not agent_mismatch
	not customer_mismatch
	not verified_expired
}

valid_approval if valid_static_approval

valid_approval if valid_verified_approval

# Action names: the platform's action field is free text, ours are snake_case. A record's action
# matches input.action when, trimmed and lower-cased with "-" and " " read as "_", it is the
# same name ("Export-Data" and "export data" are export_data), or when
# data.plant.config.approval_action_aliases maps that name to it ("agent.delete", the deployed
# OPA's name, is delete_agent). Never by prefix or wildcard: "delete" or "export" approve nothing.
record_action := strings.replace_n({"-": "_", " ": "_"}, lower(trim_space(input.approval.action))) if {
	is_string(input.approval.action)
}

action_matches if record_action == common.action

action_matches if data.plant.config.approval_action_aliases[record_action] == common.action

# The agent a request names: the id of /agents/{id}, else the token's agent_id claim.
request_agent := input.resource_id if {
	input.resource == "agents"
	is_string(input.resource_id)
} else := common.agent_id

# The customer a request names: the id of /customers/{id}, else the token's customer_id claim.
request_customer := input.resource_id if {
	input.resource == "customers"
	is_string(input.resource_id)
} else := common.jwt.customer_id

agent_mismatch if {
	is_string(input.approval.agent_id)
	is_string(request_agent)
	input.approval.agent_id != request_agent
}

customer_mismatch if {
	is_string(input.approval.customer_id)
	is_string(request_customer)
	input.approval.customer_id != request_customer
}

verified_expired if {
	is_number(input.approval.expires_ns)
	input.approval.expires_ns <= common.now_ns
}

# When the approval used stops being valid (null: a platform record without expiry).
approval_expires_ns := approval.expires_ns if {
	valid_static_approval
} else := input.approval.expires_ns if {
	valid_verified_approval
	is_number(input.approval.expires_ns)
}

approval_required if {
	sensitive
	not is_governor
	not valid_approval
}

approval_used if {
	sensitive
	not is_governor
	valid_approval
}

agent_id := common.agent_id

approval_outcome := {
	"allow": false,
	"status": 307,
	"kind": "governor-approval-required",
	"reason": sprintf("action '%s' needs Governor approval", [common.action]),
	"required_permission": common.action,
	"redirect": {"action": common.action, "agent_id": agent_id},
}
