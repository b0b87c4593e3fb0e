# Plant Gateway agent budget hook: tells the budget step whether and for whom to charge.
# Critical agents (data.plant.config.critical_agents) and the Governor pass the platform high-water mark.
package plant.gateway.budget

import rego.v1

import data.plant.gateway.common
import data.plant.gateway.governor


agent_id := common.agent_id

critical_agent if {
	agent_id != null
	agent_id in data.plant.config.critical_agents
}

default critical_agent := false

default is_governor := false

is_governor if governor.is_governor

# Charge only an allowed request (data.plant.gateway.allow).
default charge := false

charge if data.plant.gateway.allow == true

hook := {
	"charge": charge,
	"agent_id": agent_id,
	"critical_agent": critical_agent,
	"governor": is_governor,
}
