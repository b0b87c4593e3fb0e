# The Plant stack: gateway, backend (internal only), OPA, Memorystore Redis, VPC connector and
# an external HTTPS load balancer that sends all public traffic to the gateway.

locals {
  suffix = var.environment
  labels = {
    app         = "plant"
    environment = var.environment
    managed-by  = "terraform"
  }
  gateway_name = "${var.name_prefix}-plant-gateway-${local.suffix}"
  backend_name = "${var.name_prefix}-plant-backend-${local.suffix}"
  opa_name     = "${var.name_prefix}-opa-${local.suffix}"
  gateway_secrets = {
    DATABASE_URL         = { secret = var.secret_ids.database_url }
    JWT_SECRET           = { secret = var.secret_ids.jwt_secret }
    LAUNCHDARKLY_SDK_KEY = { secret = var.secret_ids.launchdarkly_sdk_key }
    CP_REGISTRATION_KEY  = { secret = var.secret_ids.cp_registration_key }
    REDIS_URL            = { secret = google_secret_manager_secret.redis_url.secret_id }
  }
  # opt-in: a deployment without the secret keeps deploying (checkpoints unsigned, one warning)
  gateway_optional_secrets = var.secret_ids.audit_chain_key == null ? {} : {
    AUDIT_CHAIN_KEY = { secret = var.secret_ids.audit_chain_key }
  }
}

data "google_sql_database_instance" "plant" {
  project = var.project_id
  name    = var.cloud_sql_instance
}

# --- identities -------------------------------------------------------------------------------

resource "google_service_account" "gateway" {
  project      = var.project_id
  account_id   = "plant-gateway-${local.suffix}"
  display_name = "Plant Gateway (${var.environment})"
}

resource "google_service_account" "backend" {
  project      = var.project_id
  account_id   = "plant-backend-${local.suffix}"
  display_name = "Plant Backend (${var.environment})"
}

resource "google_service_account" "opa" {
  project      = var.project_id
  account_id   = "plant-opa-${local.suffix}"
  display_name = "OPA policy engine (${var.environment})"
}

resource "google_project_iam_member" "gateway_sql_client" {
  project = var.project_id
  role    = "roles/cloudsql.client"
  member  = "serviceAccount:${google_service_account.gateway.email}"
}

resource "google_project_iam_member" "backend_sql_client" {
  project = var.project_id
  role    = "roles/cloudsql.client"
  member  = "serviceAccount:${google_service_account.backend.email}"
}

resource "google_secret_manager_secret_iam_member" "gateway" {
  for_each = merge(local.gateway_secrets, local.gateway_optional_secrets)

  project   = var.project_id
  secret_id = each.value.secret
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${google_service_account.gateway.email}"
}

# --- network ----------------------------------------------------------------------------------

resource "google_vpc_access_connector" "plant" {
  project       = var.project_id
  region        = var.region
  name          = "plant-${local.suffix}"
  network       = var.network
  ip_cidr_range = var.vpc_connector_cidr
  min_instances = 2
  max_instances = 3
}

# --- Redis (shared counters: rate limits, revocation, budgets) --------------------------------

resource "google_redis_instance" "plant" {
  project                 = var.project_id
  region                  = var.region
  name                    = "plant-gateway-${local.suffix}"
  tier                    = var.redis_tier
  memory_size_gb          = var.redis_memory_gb
  redis_version           = "REDIS_7_2"
  authorized_network      = "projects/${var.project_id}/global/networks/${var.network}"
  auth_enabled            = true
  transit_encryption_mode = "DISABLED"
  labels                  = local.labels
}

# REDIS_URL carries the AUTH string, so it is a secret, not a plain env var.
resource "google_secret_manager_secret" "redis_url" {
  project   = var.project_id
  secret_id = "plant-gateway-redis-url-${local.suffix}"
  labels    = local.labels
  replication {
    auto {}
  }
}

resource "google_secret_manager_secret_version" "redis_url" {
  secret      = google_secret_manager_secret.redis_url.id
  secret_data = "redis://:${google_redis_instance.plant.auth_string}@${google_redis_instance.plant.host}:${google_redis_instance.plant.port}/0"
}

# --- services ---------------------------------------------------------------------------------

module "plant_backend" {
  source = "../../modules/cloud_run_service"

  project_id            = var.project_id
  region                = var.region
  name                  = local.backend_name
  image                 = var.plant_backend_image
  port                  = 8080
  service_account_email = google_service_account.backend.email
  vpc_connector         = google_vpc_access_connector.plant.id
  cloud_sql_instances   = [data.google_sql_database_instance.plant.connection_name]
  env_vars = {
    ENVIRONMENT = var.environment
  }
  # Not reachable from the internet; only the gateway's identity may invoke it.
  ingress         = "INGRESS_TRAFFIC_INTERNAL_ONLY"
  invoker_members = ["serviceAccount:${google_service_account.gateway.email}"]
  labels          = local.labels
}

module "opa" {
  source = "../../modules/cloud_run_service"

  # Internal-only ingress constrains the caller, not OPA: the gateway reaches OPA through the
  # VPC connector (see plant_gateway). OPA makes no outbound calls, so it needs no connector.
  project_id            = var.project_id
  region                = var.region
  name                  = local.opa_name
  image                 = var.opa_image
  port                  = 8181
  args                  = ["run", "--server", "--addr=0.0.0.0:8181", "--log-level=error", "/policies"]
  memory                = "256Mi"
  min_instances         = var.use_remote_opa ? 1 : 0
  max_instances         = 10
  concurrency           = 250
  service_account_email = google_service_account.opa.email
  health_path           = "/health"
  ingress               = "INGRESS_TRAFFIC_INTERNAL_ONLY"
  invoker_members       = ["serviceAccount:${google_service_account.gateway.email}"]
  labels                = local.labels
}

module "plant_gateway" {
  source = "../../modules/cloud_run_service"

  # Egress: the backend's and OPA's run.app URLs resolve to public Google IPs, so only
  # vpc_egress = ALL_TRAFFIC sends those calls through the connector, which the internal-only
  # ingress of both requires (PRIVATE_RANGES_ONLY would let them bypass the VPC and be refused).
  project_id            = var.project_id
  region                = var.region
  name                  = local.gateway_name
  image                 = var.plant_gateway_image
  port                  = 8000
  cpu                   = "1"
  memory                = "512Mi"
  min_instances         = var.gateway_min_instances
  max_instances         = var.gateway_max_instances
  concurrency           = 250
  timeout_seconds       = 300
  cpu_idle              = false # audit batches and spool replay run between requests
  service_account_email = google_service_account.gateway.email
  vpc_connector         = google_vpc_access_connector.plant.id
  vpc_egress            = "ALL_TRAFFIC"
  cloud_sql_instances   = [data.google_sql_database_instance.plant.connection_name]
  # probes on the public port: /health answers there; /metrics and the detailed /ready only on
  # the admin listener (ADMIN_PORT, loopback), scraped by the collector sidecar (monitoring.tf)
  health_path    = "/health"
  container_name = "gateway"
  metrics_collector = var.enable_metrics_collector ? {
    image         = var.metrics_collector_image
    config_secret = google_secret_manager_secret.run_monitoring[0].secret_id
  } : null
  env_vars = merge({
    ENVIRONMENT                = var.environment
    ADMIN_PORT                 = tostring(var.gateway_admin_port)
    GATEWAY_TYPE               = var.gateway_type
    PLANT_BACKEND_URL          = module.plant_backend.uri
    PLANT_BACKEND_USE_ID_TOKEN = "true"
    PLANT_BACKEND_AUDIENCE     = module.plant_backend.uri
    OPA_SERVICE_URL            = var.use_remote_opa ? module.opa.uri : ""
    OPA_DECISION_PATH          = var.use_remote_opa ? "plant/gateway/decision" : ""
    CLOUD_SQL_CONNECTION_NAME  = data.google_sql_database_instance.plant.connection_name
    JWT_ISSUERS                = join(",", var.jwt_issuers)
    CORS_ORIGINS               = join(",", var.cors_origins)
    APPROVAL_UI_URL            = var.approval_ui_url
    TRUSTED_PROXY_HOPS         = tostring(var.trusted_proxy_hops)
    LOG_LEVEL                  = var.environment == "prod" ? "INFO" : "DEBUG"
    GOOGLE_CLOUD_PROJECT       = var.project_id
  }, var.extra_env)
  secrets = merge(local.gateway_secrets, local.gateway_optional_secrets)
  # Reachable only through the load balancer; every caller is authenticated by the gateway.
  ingress         = "INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER"
  invoker_members = ["allUsers"]
  labels          = local.labels

  depends_on = [
    google_secret_manager_secret_iam_member.gateway,
    google_secret_manager_secret_version.redis_url,
    google_project_iam_member.gateway_sql_client,
    google_secret_manager_secret_version.run_monitoring,
    google_secret_manager_secret_iam_member.gateway_run_monitoring,
    google_project_iam_member.gateway_metric_writer,
  ]
}

# --- external HTTPS load balancer -> gateway --------------------------------------------------

resource "google_compute_region_network_endpoint_group" "gateway" {
  project               = var.project_id
  region                = var.region
  name                  = "plant-gateway-neg-${local.suffix}"
  network_endpoint_type = "SERVERLESS"
  cloud_run {
    service = module.plant_gateway.name
  }
}

resource "google_compute_backend_service" "gateway" {
  project               = var.project_id
  name                  = "plant-gateway-backend-${local.suffix}"
  load_balancing_scheme = "EXTERNAL_MANAGED"
  protocol              = "HTTPS"
  log_config {
    enable      = true
    sample_rate = 1.0
  }
  backend {
    group = google_compute_region_network_endpoint_group.gateway.id
  }
}

resource "google_compute_url_map" "plant" {
  project         = var.project_id
  name            = "plant-lb-${local.suffix}"
  default_service = google_compute_backend_service.gateway.id
}

resource "google_compute_managed_ssl_certificate" "plant" {
  project = var.project_id
  name    = "plant-cert-${local.suffix}"
  managed {
    domains = var.domains
  }
}

resource "google_compute_target_https_proxy" "plant" {
  project          = var.project_id
  name             = "plant-https-${local.suffix}"
  url_map          = google_compute_url_map.plant.id
  ssl_certificates = [google_compute_managed_ssl_certificate.plant.id]
}

resource "google_compute_global_address" "plant" {
  project = var.project_id
  name    = "plant-lb-ip-${local.suffix}"
}

resource "google_compute_global_forwarding_rule" "https" {
  project               = var.project_id
  name                  = "plant-https-${local.suffix}"
  load_balancing_scheme = "EXTERNAL_MANAGED"
  target                = google_compute_target_https_proxy.plant.id
  ip_address            = google_compute_global_address.plant.address
  port_range            = "443"
}

# Plain HTTP only redirects to HTTPS.
resource "google_compute_url_map" "http_redirect" {
  project = var.project_id
  name    = "plant-http-redirect-${local.suffix}"
  default_url_redirect {
    https_redirect         = true
    redirect_response_code = "MOVED_PERMANENTLY_DEFAULT"
    strip_query            = false
  }
}

resource "google_compute_target_http_proxy" "redirect" {
  project = var.project_id
  name    = "plant-http-${local.suffix}"
  url_map = google_compute_url_map.http_redirect.id
}

resource "google_compute_global_forwarding_rule" "http" {
  project               = var.project_id
  name                  = "plant-http-${local.suffix}"
  load_balancing_scheme = "EXTERNAL_MANAGED"
  target                = google_compute_target_http_proxy.redirect.id
  ip_address            = google_compute_global_address.plant.address
  port_range            = "80"
}
