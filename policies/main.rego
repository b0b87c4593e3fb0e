# Plant Gateway: the one entry point, data.plant.gateway.decision.
# One evaluation answers everything the gateway enforces for a request (spec §1.5).
package plant.gateway

import rego.v1

import data.plant.gateway.budget
import data.plant.gateway.common
import data.plant.gateway.governor
import data.plant.gateway.rbac
import data.plant.gateway.sandbox
import data.plant.gateway.trial

# A flag missing from the input counts as on: a check is skipped only when explicitly off.
flag(name) := input.flags[name] if is_boolean(input.flags[name]) else := true

flags := {
	"rbac": flag("rbac"),
	"trial_mode": flag("trial_mode"),
	"governor_approval": flag("governor_approval"),
	"sandbox_routing": flag("sandbox_routing"),
}

# Every failed check is numbered; the lowest number wins (the order of spec §1.5).
# The request is allowed only when no check failed: an undefined denial denies (no decision).
failed contains 1 if not common.well_formed

failed contains 2 if {
	flags.trial_mode
	trial.expired
}

failed contains 3 if {
	flags.rbac
	rbac.governor_only_denied
}

failed contains 4 if {
	flags.rbac
	not rbac.allowed
}

failed contains 5 if {
	flags.trial_mode
	trial.blocked
}

failed contains 6 if {
	flags.governor_approval
	governor.approval_required
}

denial(1) := common.malformed_outcome

denial(2) := trial.expired_outcome

denial(3) := rbac.governor_only_outcome

denial(4) := rbac.denied_outcome

denial(5) := trial.blocked_outcome

denial(6) := governor.approval_outcome

allowed_outcome := {
	"allow": true,
	"status": 200,
	"kind": null,
	"reason": "allowed",
	"required_permission": null,
	"redirect": null,
}

outcome := denial(min(failed)) if count(failed) > 0 else := allowed_outcome if count(failed) == 0

target_backend := sandbox.target_backend if flags.sandbox_routing else := "production"

count_trial_task if {
	flags.trial_mode
	outcome.allow
	trial.counts_task
}

default count_trial_task := false

obligations := {
	"count_trial_task": count_trial_task,
	"budget": budget.hook(outcome.allow),
	"mask_fields": rbac.mask_fields,
}

evaluated contains "plant.gateway"

evaluated contains "plant.gateway.rbac" if flags.rbac

evaluated contains "plant.gateway.trial" if flags.trial_mode

evaluated contains "plant.gateway.governor" if flags.governor_approval

evaluated contains "plant.gateway.sandbox" if flags.sandbox_routing

evaluated contains "plant.gateway.budget"

policies := sort([p | some p in evaluated])

# A cached decision stays valid until the earliest time-bound fact it used expires.
expiries contains trial.expires_ns if {
	flags.trial_mode
	trial.is_trial
	not trial.expired
}

expiries contains governor.approval_expires_ns if {
	flags.governor_approval
	governor.approval_used
}

valid_until_ns := min(expiries) if count(expiries) > 0 else := null

decision := object.union(outcome, {
	"resource": common.resource,
	"action": common.action,
	"target_backend": target_backend,
	"obligations": obligations,
	"policies": policies,
	"valid_until_ns": valid_until_ns,
})
