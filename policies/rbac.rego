# Plant Gateway RBAC: role hierarchy and minimum level per action, both from policy data.
# Governor-only resources need one of the governor-only roles (admin, customer_admin).
package plant.gateway.rbac

import rego.v1

import data.plant.gateway.common


required_level := data.plant.config.action_levels[input.action]

# Directly over the caller's roles (cheaper in rego-cpp than min() over a set of levels).
allowed if {
	some role in common.roles
	data.plant.config.role_hierarchy[data.plant.config.role_mapping[role]] <= required_level
}

# A caller that proved a service key (only on the configured service-key routes) is not a user.
allowed if input.client.service_key == true

# A platform customer (CP/mobile token: role "user") removes and approves what it owns: its
# hired agents' goals and connections, its deliverables, drafts and flow runs. Which customer
# owns the row is the backend's check (and the gateway's tenant binding where configured).
allowed if {
	input.action in data.plant.config.owner_actions
	input.resource in data.plant.config.owner_resources
	some role in common.roles
	role in data.plant.config.owner_roles
}

required_permission := sprintf("%s:%s", [common.resource, common.action])

denied_outcome := {
	"allow": false,
	"status": 403,
	"kind": "permission-denied",
	"reason": reason,
	"required_permission": required_permission,
	"redirect": null,
}

reason := sprintf("action '%s' on '%s' is not a known action", [common.action, common.resource]) if {
	not data.plant.config.action_levels[input.action]
} else := "the caller holds no known role" if {
	not common.best_level
} else := sprintf("action '%s' needs role level %d or better", [common.action, required_level])

governor_only_denied if {
	input.resource in data.plant.config.governor_only_resources
	not holds_governor_only_role
}

holds_governor_only_role if {
	some name in common.mapped_roles
	name in data.plant.config.governor_only_roles
}

governor_only_outcome := {
	"allow": false,
	"status": 403,
	"kind": "permission-denied",
	"reason": sprintf("resource '%s' is reserved to the governor-only roles", [common.resource]),
	"required_permission": sprintf("%s:%s", [common.resource, "manage"]),
	"redirect": null,
}

# Fields the gateway masks in JSON answers for this caller, by mapped role (data, empty by default).
default mask_fields := []

mask_fields := sort([f | some name in common.mapped_roles; some f in object.get(data.plant.config.mask_fields, name, [])]) if {
	count(data.plant.config.mask_fields) > 0
}
