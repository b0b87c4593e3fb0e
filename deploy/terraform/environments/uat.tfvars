# UAT: production-shaped, smaller. Images are passed by CI: -var plant_gateway_image=... etc.
project_id         = "waooaw-oauth"
region             = "asia-south1"
environment        = "uat"
domains            = ["plant-uat.waooaw.com"]
cloud_sql_instance = "plant-sql-uat"
network            = "default"
vpc_connector_cidr = "10.8.0.16/28"
redis_tier         = "BASIC"
redis_memory_gb    = 1

gateway_min_instances = 1
gateway_max_instances = 10

cors_origins = ["https://cp-uat.waooaw.com", "https://pp-uat.waooaw.com"]

secret_ids = {
  database_url         = "plant-gateway-database-url-uat"
  jwt_secret           = "jwt-secret-uat"
  launchdarkly_sdk_key = "launchdarkly-sdk-key-uat"
  cp_registration_key  = "cp-registration-key-uat"
  # audit_chain_key    = "plant-gateway-audit-chain-key-uat"  # opt-in: create the secret, then set it
}
