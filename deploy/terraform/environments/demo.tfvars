# Demo: smallest footprint. Images are passed by CI: -var plant_gateway_image=... etc.
project_id         = "waooaw-oauth"
region             = "asia-south1"
environment        = "demo"
domains            = ["plant-demo.waooaw.com"]
cloud_sql_instance = "plant-sql-demo"
network            = "default"
vpc_connector_cidr = "10.8.0.0/28"
redis_tier         = "BASIC"
redis_memory_gb    = 1

gateway_min_instances = 1
gateway_max_instances = 10

cors_origins = ["https://cp-demo.waooaw.com", "https://pp-demo.waooaw.com"]

secret_ids = {
  database_url         = "plant-gateway-database-url-demo"
  jwt_secret           = "jwt-secret-demo"
  launchdarkly_sdk_key = "launchdarkly-sdk-key-demo"
  cp_registration_key  = "cp-registration-key-demo"
  # audit_chain_key    = "plant-gateway-audit-chain-key-demo"  # opt-in: create the secret, then set it
}
