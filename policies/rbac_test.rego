# Tests of RBAC: the role mapping, the hierarchy, the action table and governor-only resources.
# Each rule is tested both ways; input fields are replaced one by one (rego-cpp limitation).
package plant.gateway.rbac_test

import rego.v1

import data.plant.gateway.rbac

jwt(roles) := {"user_id": "u-1", "roles": roles}

test_viewer_can_read if {
	rbac.allowed with input.jwt as jwt(["viewer"]) with input.resource as "agents" with input.action as "read"
}

test_viewer_cannot_create if {
	not rbac.allowed with input.jwt as jwt(["viewer"]) with input.resource as "agents" with input.action as "create"
}

test_developer_can_create_update_execute_deploy if {
	rbac.allowed with input.jwt as jwt(["developer"]) with input.resource as "agents" with input.action as "create"
	rbac.allowed with input.jwt as jwt(["developer"]) with input.resource as "agents" with input.action as "update"
	rbac.allowed with input.jwt as jwt(["developer"]) with input.resource as "agents" with input.action as "execute"
	rbac.allowed with input.jwt as jwt(["developer"]) with input.resource as "agents" with input.action as "deploy"
}

test_manager_cannot_create if {
	not rbac.allowed with input.jwt as jwt(["manager"]) with input.resource as "agents" with input.action as "create"
}

test_developer_cannot_delete_approve_manage if {
	not rbac.allowed with input.jwt as jwt(["developer"]) with input.resource as "agents" with input.action as "delete"
	not rbac.allowed with input.jwt as jwt(["developer"]) with input.resource as "agents" with input.action as "approve"
	not rbac.allowed with input.jwt as jwt(["developer"]) with input.resource as "agents" with input.action as "manage"
}

test_customer_admin_can_delete_approve_manage if {
	rbac.allowed with input.jwt as jwt(["customer_admin"]) with input.resource as "agents" with input.action as "delete"
	rbac.allowed with input.jwt as jwt(["customer_admin"]) with input.resource as "agents" with input.action as "approve"
	rbac.allowed with input.jwt as jwt(["customer_admin"]) with input.resource as "agents" with input.action as "manage"
}

test_admin_can_do_every_listed_action if {
	rbac.allowed with input.jwt as jwt(["admin"]) with input.resource as "agents" with input.action as "read"
	rbac.allowed with input.jwt as jwt(["admin"]) with input.resource as "agents" with input.action as "create"
	rbac.allowed with input.jwt as jwt(["admin"]) with input.resource as "agents" with input.action as "update"
	rbac.allowed with input.jwt as jwt(["admin"]) with input.resource as "agents" with input.action as "execute"
	rbac.allowed with input.jwt as jwt(["admin"]) with input.resource as "agents" with input.action as "deploy"
	rbac.allowed with input.jwt as jwt(["admin"]) with input.resource as "agents" with input.action as "delete"
	rbac.allowed with input.jwt as jwt(["admin"]) with input.resource as "agents" with input.action as "approve"
	rbac.allowed with input.jwt as jwt(["admin"]) with input.resource as "agents" with input.action as "manage"
	rbac.allowed with input.jwt as jwt(["admin"]) with input.resource as "agents" with input.action as "delete_agent"
	rbac.allowed with input.jwt as jwt(["admin"]) with input.resource as "agents" with input.action as "delete_customer"
	rbac.allowed with input.jwt as jwt(["admin"]) with input.resource as "agents" with input.action as "update_billing"
	rbac.allowed with input.jwt as jwt(["admin"]) with input.resource as "agents" with input.action as "change_subscription"
	rbac.allowed with input.jwt as jwt(["admin"]) with input.resource as "agents" with input.action as "export_data"
}

test_user_maps_to_developer if {
	rbac.allowed with input.jwt as jwt(["user"]) with input.resource as "agents" with input.action as "execute"
	not rbac.allowed with input.jwt as jwt(["user"]) with input.resource as "agents" with input.action as "delete"
}

test_agent_ops_maps_to_developer if {
	rbac.allowed with input.jwt as jwt(["agent_ops"]) with input.resource as "agents" with input.action as "deploy"
	not rbac.allowed with input.jwt as jwt(["agent_ops"]) with input.resource as "agents" with input.action as "approve"
}

test_readonly_maps_to_viewer if {
	rbac.allowed with input.jwt as jwt(["readonly"]) with input.resource as "agents" with input.action as "read"
	not rbac.allowed with input.jwt as jwt(["readonly"]) with input.resource as "agents" with input.action as "update"
}

test_unknown_role_grants_nothing if {
	not rbac.allowed with input.jwt as jwt(["superuser"]) with input.resource as "agents" with input.action as "read"
}

test_no_roles_grants_nothing if {
	not rbac.allowed with input.jwt as jwt([]) with input.resource as "agents" with input.action as "read"
}

test_roles_not_a_list_grants_nothing if {
	not rbac.allowed with input.jwt as {"roles": "admin"} with input.resource as "agents" with input.action as "read"
}

test_non_string_role_grants_nothing if {
	not rbac.allowed with input.jwt as jwt([1, {"admin": true}]) with input.resource as "agents" with input.action as "read"
}

test_best_role_wins if {
	rbac.allowed with input.jwt as jwt(["readonly", "admin"]) with input.resource as "agents" with input.action as "delete"
}

test_unknown_action_denied if {
	not rbac.allowed with input.jwt as jwt(["admin"]) with input.resource as "agents" with input.action as "launch"
}

test_denial_names_permission if {
	o := rbac.denied_outcome with input.jwt as jwt(["viewer"]) with input.resource as "tasks" with input.action as "create"
	o.required_permission == "tasks:create"
	o.status == 403
	o.reason == "action 'create' needs role level 3 or better"
}

test_denial_reason_unknown_role if {
	o := rbac.denied_outcome with input.jwt as jwt(["nobody"]) with input.resource as "tasks" with input.action as "read"
	o.reason == "the caller holds no known role"
}

test_denial_reason_unknown_action if {
	o := rbac.denied_outcome with input.jwt as jwt(["admin"]) with input.resource as "tasks" with input.action as "launch"
	o.reason == "action 'launch' on 'tasks' is not a known action"
}

test_governor_only_resource_denied_to_developer if {
	rbac.governor_only_denied with input.jwt as jwt(["developer"]) with input.resource as "governor" with input.action as "read"
	rbac.governor_only_denied with input.jwt as jwt(["developer"]) with input.resource as "platform_config" with input.action as "read"
	rbac.governor_only_denied with input.jwt as jwt(["developer"]) with input.resource as "feature_flags" with input.action as "read"
}

test_governor_only_resource_open_to_admins if {
	not rbac.governor_only_denied with input.jwt as jwt(["admin"]) with input.resource as "platform_config" with input.action as "read"
	not rbac.governor_only_denied with input.jwt as jwt(["customer_admin"]) with input.resource as "platform_config" with input.action as "read"
}

test_ordinary_resource_not_governor_only if {
	not rbac.governor_only_denied with input.jwt as jwt(["viewer"]) with input.resource as "agents" with input.action as "read"
}

test_mask_fields_from_data if {
	f := rbac.mask_fields with input.jwt as jwt(["readonly"]) with input.resource as "customers"
		with data.plant.config.mask_fields as {"viewer": ["phone", "email"]}
	f == ["email", "phone"]
}

test_no_mask_fields_by_default if {
	f := rbac.mask_fields with input.jwt as jwt(["readonly"]) with input.resource as "customers"
	f == []
}

test_service_key_caller_allowed if {
	rbac.allowed with input.jwt as {} with input.client as {"service_key": true}
		with input.resource as "customers" with input.action as "create"
}

test_service_role_claim_grants_nothing if {
	not rbac.allowed with input.jwt as jwt(["service"]) with input.client as {"service_key": false}
		with input.resource as "customers" with input.action as "create"
}

test_mask_fields_only_for_configured_roles if {
	f := rbac.mask_fields with input.jwt as jwt(["admin"]) with input.resource as "customers"
		with data.plant.config.mask_fields as {"viewer": ["phone", "email"]}
	f == []
}

test_customer_deletes_and_approves_what_it_owns if {
	rbac.allowed with input.jwt as jwt(["user"]) with input.resource as "hired_agents" with input.action as "delete"
	rbac.allowed with input.jwt as jwt(["user"]) with input.resource as "marketing" with input.action as "approve"
	rbac.allowed with input.jwt as jwt(["user"]) with input.resource as "approvals" with input.action as "approve"
}

test_customer_grant_is_limited_to_owned_resources_and_actions if {
	not rbac.allowed with input.jwt as jwt(["user"]) with input.resource as "agents" with input.action as "delete"
	not rbac.allowed with input.jwt as jwt(["user"]) with input.resource as "customers" with input.action as "approve"
	not rbac.allowed with input.jwt as jwt(["user"]) with input.resource as "hired_agents" with input.action as "manage"
	not rbac.allowed with input.jwt as jwt(["readonly"]) with input.resource as "hired_agents" with input.action as "delete"
}
