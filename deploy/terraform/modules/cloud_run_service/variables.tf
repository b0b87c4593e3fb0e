# Inputs of one Cloud Run (v2) service: image, size, scaling, env, secrets, network, access.

variable "project_id" {
  type        = string
  description = "GCP project that owns the service."
}

variable "region" {
  type        = string
  description = "Cloud Run region."
}

variable "name" {
  type        = string
  description = "Service name."
}

variable "image" {
  type        = string
  description = "Container image URI (Artifact Registry)."
}

variable "port" {
  type        = number
  default     = 8080
  description = "Container port; Cloud Run passes it to the container as $PORT."
}

variable "cpu" {
  type        = string
  default     = "1"
  description = "vCPU limit per instance."
}

variable "memory" {
  type        = string
  default     = "512Mi"
  description = "Memory limit per instance."
}

variable "min_instances" {
  type    = number
  default = 0
}

variable "max_instances" {
  type    = number
  default = 10
}

variable "concurrency" {
  type        = number
  default     = 80
  description = "Maximum concurrent requests per instance."
}

variable "timeout_seconds" {
  type    = number
  default = 300
}

variable "cpu_idle" {
  type        = bool
  default     = true
  description = "Throttle CPU outside requests (false keeps background work such as audit batching alive)."
}

variable "startup_cpu_boost" {
  type    = bool
  default = true
}

variable "args" {
  type        = list(string)
  default     = null
  description = "Container arguments (null keeps the image's CMD)."
}

variable "env_vars" {
  type        = map(string)
  default     = {}
  description = "Plain environment variables."
}

variable "secrets" {
  type = map(object({
    secret  = string
    version = optional(string, "latest")
  }))
  default     = {}
  description = "Environment variables read from Secret Manager: NAME => { secret, version }."
}

variable "service_account_email" {
  type        = string
  description = "Identity the service runs as."
}

variable "vpc_connector" {
  type        = string
  default     = null
  description = "Serverless VPC Access connector id (null: no VPC egress)."
}

variable "vpc_egress" {
  type        = string
  default     = "PRIVATE_RANGES_ONLY"
  description = "ALL_TRAFFIC or PRIVATE_RANGES_ONLY."
  validation {
    condition     = contains(["ALL_TRAFFIC", "PRIVATE_RANGES_ONLY"], var.vpc_egress)
    error_message = "vpc_egress must be ALL_TRAFFIC or PRIVATE_RANGES_ONLY."
  }
}

variable "cloud_sql_instances" {
  type        = list(string)
  default     = []
  description = "Cloud SQL connection names mounted at /cloudsql."
}

variable "ingress" {
  type        = string
  default     = "INGRESS_TRAFFIC_ALL"
  description = "INGRESS_TRAFFIC_ALL, INGRESS_TRAFFIC_INTERNAL_ONLY or INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER."
  validation {
    condition = contains([
      "INGRESS_TRAFFIC_ALL",
      "INGRESS_TRAFFIC_INTERNAL_ONLY",
      "INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER",
    ], var.ingress)
    error_message = "Unknown ingress setting."
  }
}

variable "invoker_members" {
  type        = list(string)
  default     = []
  description = "Members granted roles/run.invoker (e.g. serviceAccount:..., or allUsers for a public API)."
}

variable "health_path" {
  type        = string
  default     = null
  description = "HTTP path for startup and liveness probes (null: TCP startup probe only)."
}

variable "labels" {
  type    = map(string)
  default = {}
}

variable "deletion_protection" {
  type    = bool
  default = true
}

variable "container_name" {
  type        = string
  default     = "service"
  description = "Name of the service's (ingress) container; a sidecar starts after it."
}

variable "metrics_collector" {
  type = object({
    image         = string
    config_secret = string
    cpu           = optional(string, "500m")
    memory        = optional(string, "256Mi")
  })
  default     = null
  description = "Managed Service for Prometheus sidecar: its image and the Secret Manager secret holding its RunMonitoring config.yaml (null: no sidecar)."
}
