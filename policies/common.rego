# Plant Gateway: helpers shared by the policies (caller roles, clock, configuration data).
# Role names map onto the hierarchy through data.plant.config.role_mapping; unknown ones grant nothing.
package plant.gateway.common

import rego.v1


jwt := input.jwt if is_object(input.jwt) else := {}

roles := jwt.roles if is_array(jwt.roles) else := []

# (object.get on input is avoided: rego-cpp 1.5 crashes on it under `with input as`.)
# Always-defined views of the request, so a reason or a permission is never undefined.
resource := input.resource if is_string(input.resource) else := ""

action := input.action if is_string(input.action) else := ""

# The input names a resource and an action: nothing is allowed otherwise.
well_formed if {
	is_string(input.resource)
	is_string(input.action)
	input.resource != ""
	input.action != ""
}

# The negation of well_formed, as plain rules (the cheaper form for rego-cpp).
malformed if resource == ""

malformed if action == ""

# Hierarchy names of the caller's roles (unknown names are dropped).
mapped_roles contains name if {
	some role in roles
	is_string(role)
	name := data.plant.config.role_mapping[role]
}

levels contains data.plant.config.role_hierarchy[name] if some name in mapped_roles

# The caller's best (lowest) level; undefined when no role is known.
best_level := min(levels) if count(levels) > 0

now_ns := input.now_ns if is_number(input.now_ns) else := time.now_ns()

# Optional string claims, null when missing (rules, not a function: rego-cpp calls are slow).
agent_id := jwt.agent_id if jwt.agent_id != null else := null

governor_agent_id := jwt.governor_agent_id if jwt.governor_agent_id != null else := null

malformed_outcome := {
	"allow": false,
	"status": 403,
	"kind": "permission-denied",
	"reason": "the request names no resource or action",
	"required_permission": null,
	"redirect": null,
}
