# Plant Gateway governor approval: sensitive actions need the Governor or a valid approval.
# An approval is a record in data.plant.config.approvals, named by input.approval.id (header X-Governor-Approval-ID).
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

# A valid approval names this user and this action and has not expired.
valid_approval if {
	approval.user_id == input.jwt.user_id
	approval.action == input.action
	object.get(approval, "resource", input.resource) == input.resource
	approval.expires_ns > common.now_ns
}

approval_expires_ns := approval.expires_ns if valid_approval

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
