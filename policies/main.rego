# Plant Gateway: the one entry point, data.plant.gateway.decision.
# One evaluation answers everything the gateway enforces for a request (README → Architecture map).
package plant.gateway

import rego.v1

import data.plant.gateway.budget
import data.plant.gateway.common
import data.plant.gateway.governor
import data.plant.gateway.rbac
import data.plant.gateway.sandbox
import data.plant.gateway.trial

# A flag missing from the input counts as on: a check is skipped only when explicitly off.
# (Plain rules, not a function: each function call costs rego-cpp tens of µs.)
default rbac_on := true

rbac_on := false if input.flags.rbac == false

default trial_on := true

trial_on := false if input.flags.trial_mode == false

default governor_on := true

governor_on := false if input.flags.governor_approval == false

default sandbox_on := true

sandbox_on := false if input.flags.sandbox_routing == false

# The first failed check wins, in the order below; allowed only when none failed.
outcome := common.malformed_outcome if {
	common.malformed
} else := trial.expired_outcome if {
	trial_on
	trial.expired
} else := rbac.governor_only_outcome if {
	rbac_on
	rbac.governor_only_denied
} else := rbac.denied_outcome if {
	rbac_on
	not rbac.allowed
} else := trial.blocked_outcome if {
	trial_on
	trial.blocked
} else := governor.approval_outcome if {
	governor_on
	governor.approval_required
} else := allowed_outcome

allowed_outcome := {
	"allow": true,
	"status": 200,
	"kind": null,
	"reason": "allowed",
	"required_permission": null,
	"redirect": null,
}

allow := outcome.allow

target_backend := sandbox.target_backend if sandbox_on else := "production"

count_trial_task if {
	trial_on
	allow
	trial.counts_task
}

default count_trial_task := false

obligations := {
	"count_trial_task": count_trial_task,
	"budget": budget.hook,
	"mask_fields": rbac.mask_fields,
}

# Sorted names of the policies evaluated; a constant when no flag is off (the usual case).
every_policy := [
	"plant.gateway",
	"plant.gateway.budget",
	"plant.gateway.governor",
	"plant.gateway.rbac",
	"plant.gateway.sandbox",
	"plant.gateway.trial",
]

policies := every_policy if {
	rbac_on
	trial_on
	governor_on
	sandbox_on
} else := sort([p | some p in evaluated])

evaluated contains "plant.gateway"

evaluated contains "plant.gateway.rbac" if rbac_on

evaluated contains "plant.gateway.trial" if trial_on

evaluated contains "plant.gateway.governor" if governor_on

evaluated contains "plant.gateway.sandbox" if sandbox_on

evaluated contains "plant.gateway.budget"

# A cached decision stays valid until the earliest time-bound fact it used expires.
trial_expiry := trial.expires_ns if {
	trial_on
	trial.is_trial
	trial.expires_ns > common.now_ns
}

approval_expiry := governor.approval_expires_ns if {
	governor_on
	governor.approval_used
}

# The request passes on the strength of an approval: the gateway consumes it (single use).
default approval_used := false

approval_used if {
	governor_on
	allow
	governor.approval_used
}

approval_expires_ns := approval_expiry if approval_used else := null

# Without an approval in the input only the trial can bound it (the usual, cheaper case).
valid_until_ns := trial_expiry if {
	not input.approval
} else := null if {
	not input.approval
} else := min({trial_expiry, approval_expiry}) if {
	trial_expiry
	approval_expiry
} else := trial_expiry if {
	trial_expiry
} else := approval_expiry if {
	approval_expiry
} else := null

decision := object.union(outcome, {
	"resource": common.resource,
	"action": common.action,
	"target_backend": target_backend,
	"obligations": obligations,
	"policies": policies,
	"valid_until_ns": valid_until_ns,
	"approval_used": approval_used,
	"approval_expires_ns": approval_expires_ns,
})
