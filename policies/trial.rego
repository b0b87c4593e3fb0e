# Plant Gateway trial mode: expired trials, resources closed to trial users, task counting.
# The daily task quota itself is counted by the gateway (step trial_quota) using count_trial_task.
package plant.gateway.trial

import rego.v1

import data.plant.gateway.common


is_trial if input.jwt.trial_mode == true

# The gateway normalises the ISO 8601 claim to nanoseconds; a missing or bad value is expired.
expires_ns := input.jwt.trial_expires_ns if is_number(input.jwt.trial_expires_ns)

default expiry_ns := 0

expiry_ns := expires_ns

expired if {
	is_trial
	expiry_ns <= common.now_ns
}

expired_outcome := {
	"allow": false,
	"status": 403,
	"kind": "trial-expired",
	"reason": "the trial period has ended",
	"required_permission": null,
	"redirect": null,
}

blocked if {
	is_trial
	input.resource in data.plant.config.trial_blocked_resources
}

blocked_outcome := {
	"allow": false,
	"status": 403,
	"kind": "permission-denied",
	"reason": sprintf("trial accounts cannot access '%s'", [common.resource]),
	"required_permission": "paid_plan",
	"redirect": null,
}

counts_task if {
	is_trial
	input.resource in data.plant.config.trial_task_resources
	input.action in data.plant.config.trial_task_actions
}
