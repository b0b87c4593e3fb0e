# Plant Gateway sandbox routing: trial users go to the sandbox backend, paid users to production.
# The gateway forwards to the chosen upstream and returns the choice in X-Target-Backend.
package plant.gateway.sandbox

import rego.v1

import data.plant.gateway.trial

target_backend := "sandbox" if trial.is_trial else := "production"
