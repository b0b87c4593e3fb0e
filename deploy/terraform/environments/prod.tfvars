# Production: HA Redis. Images are passed by CI: -var plant_gateway_image=... etc.
project_id         = "waooaw-oauth"
region             = "asia-south1"
environment        = "prod"
domains            = ["plant.waooaw.com"]
cloud_sql_instance = "plant-sql-prod"
network            = "default"
vpc_connector_cidr = "10.8.0.32/28"
redis_tier         = "STANDARD_HA"
redis_memory_gb    = 5

gateway_min_instances = 1
gateway_max_instances = 10

cors_origins = ["https://cp.waooaw.com", "https://pp.waooaw.com"]

secret_ids = {
  database_url         = "plant-gateway-database-url-prod"
  jwt_secret           = "jwt-secret-prod"
  launchdarkly_sdk_key = "launchdarkly-sdk-key-prod"
  cp_registration_key  = "cp-registration-key-prod"
  # audit_chain_key    = "plant-gateway-audit-chain-key-prod"  # opt-in: create the secret, then set it
}
