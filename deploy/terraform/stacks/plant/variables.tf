# Inputs of the Plant stack; one tfvars file per environment in ../../environments/.

variable "project_id" {
  type = string
}

variable "region" {
  type    = string
  default = "asia-south1"
}

variable "environment" {
  type = string
  validation {
    condition     = contains(["demo", "uat", "prod"], var.environment)
    error_message = "environment must be demo, uat or prod."
  }
}

variable "name_prefix" {
  type    = string
  default = "waooaw"
}

# --- images (set by CI: -var plant_gateway_image=...) ----------------------------------------

variable "plant_gateway_image" {
  type        = string
  description = "Gateway image, e.g. asia-south1-docker.pkg.dev/<project>/waooaw/plant-gateway:<tag>."
}

variable "plant_backend_image" {
  type = string
}

variable "opa_image" {
  type        = string
  description = "OPA image carrying the gateway's policies/ bundle (mirrored into Artifact Registry)."
}

# --- gateway ----------------------------------------------------------------------------------

variable "gateway_type" {
  type    = string
  default = "PLANT"
}

variable "gateway_min_instances" {
  type    = number
  default = 1
}

variable "gateway_max_instances" {
  type    = number
  default = 10
}

variable "jwt_issuers" {
  type    = list(string)
  default = ["waooaw.com", "cp.waooaw.com", "pp.waooaw.com"]
}

variable "cors_origins" {
  type    = list(string)
  default = []
}

variable "approval_ui_url" {
  type    = string
  default = "https://approvals.waooaw.com/approve"
}

variable "use_remote_opa" {
  type        = bool
  default     = false
  description = "true: the gateway asks the OPA service; false: the same policies run in-process (faster)."
}

variable "trusted_proxy_hops" {
  type        = number
  default     = 2
  description = "Proxies in front of the gateway that append to X-Forwarded-For (Google LB: client and LB entries)."
}

variable "extra_env" {
  type        = map(string)
  default     = {}
  description = "More gateway settings (spec section 5), e.g. rate tiers or budgets per environment."
}

# --- secrets (Secret Manager secret ids, created and filled outside Terraform) -------------------

variable "secret_ids" {
  type = object({
    database_url         = string
    jwt_secret           = string
    launchdarkly_sdk_key = string
    cp_registration_key  = string
    audit_chain_key      = optional(string)
  })
  description = "Secret Manager secret ids wired into DATABASE_URL, JWT_SECRET, LAUNCHDARKLY_SDK_KEY, CP_REGISTRATION_KEY, and, when set, AUDIT_CHAIN_KEY (the audit checkpoints' MAC key: `openssl rand -hex 32`; optional so that an existing deployment keeps deploying without it)."
}

# --- network, database, Redis -----------------------------------------------------------------

variable "network" {
  type        = string
  default     = "default"
  description = "VPC network for the connector and Memorystore."
}

variable "vpc_connector_cidr" {
  type        = string
  description = "/28 range for the Serverless VPC Access connector."
}

variable "cloud_sql_instance" {
  type        = string
  description = "Name of the existing Cloud SQL (PostgreSQL) instance holding gateway_audit_logs."
}

variable "redis_tier" {
  type    = string
  default = "BASIC"
  validation {
    condition     = contains(["BASIC", "STANDARD_HA"], var.redis_tier)
    error_message = "redis_tier must be BASIC or STANDARD_HA."
  }
}

variable "redis_memory_gb" {
  type    = number
  default = 1
}

# --- load balancer ----------------------------------------------------------------------------

variable "domains" {
  type        = list(string)
  description = "Public host names served by the HTTPS load balancer (managed certificate)."
}

# --- observability (monitoring.tf) -------------------------------------------------------------

variable "gateway_admin_port" {
  type        = number
  default     = 8081
  description = "The gateway's admin listener (ADMIN_PORT: /metrics, the detailed /ready), on the instance's loopback; the collector sidecar scrapes it."
}

variable "enable_metrics_collector" {
  type        = bool
  default     = true
  description = "Run the Managed Service for Prometheus sidecar in the gateway's instances, and the metric alert policies."
}

variable "metrics_collector_image" {
  type        = string
  default     = "us-docker.pkg.dev/cloud-ops-agents-artifacts/cloud-run-gmp-sidecar/cloud-run-gmp-sidecar:1.2.0"
  description = "Managed Service for Prometheus sidecar image for Cloud Run."
}

variable "metrics_scrape_interval" {
  type        = string
  default     = "30s"
  description = "How often the sidecar scrapes the admin listener's /metrics."
}

variable "alert_notification_channels" {
  type        = list(string)
  default     = []
  description = "Cloud Monitoring notification channel ids (projects/<p>/notificationChannels/<id>) for every alert policy."
}
