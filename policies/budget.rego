# Plant Gateway agent budget hook: tells the budget step whether and for whom to charge.
# Critical agents (data.plant.config.critical_agents) and the Governor pass the platform high-water mark.
package plant.gateway.budget

import rego.v1

import data.plant.gateway.common
import data.plant.gateway.governor

cfg := data.plant.config

agent_id := common.jwt_claim("agent_id") if common.jwt_claim("agent_id") else := null

critical_agent if {
	agent_id != null
	agent_id in cfg.critical_agents
}

default critical_agent := false

default is_governor := false

is_governor if governor.is_governor

hook(allowed) := {
	"charge": allowed,
	"agent_id": agent_id,
	"critical_agent": critical_agent,
	"governor": is_governor,
}
