# A reusable Cloud Run (v2) service: one container, env + Secret Manager secrets, optional VPC
# connector and Cloud SQL mount, ingress setting and an explicit invoker list; optionally a
# Managed Service for Prometheus sidecar that scrapes the container over the instance's loopback.

resource "google_cloud_run_v2_service" "this" {
  project             = var.project_id
  location            = var.region
  name                = var.name
  ingress             = var.ingress
  labels              = var.labels
  deletion_protection = var.deletion_protection

  template {
    service_account                  = var.service_account_email
    timeout                          = "${var.timeout_seconds}s"
    max_instance_request_concurrency = var.concurrency
    labels                           = var.labels

    scaling {
      min_instance_count = var.min_instances
      max_instance_count = var.max_instances
    }

    dynamic "vpc_access" {
      for_each = var.vpc_connector == null ? [] : [var.vpc_connector]
      content {
        connector = vpc_access.value
        egress    = var.vpc_egress
      }
    }

    dynamic "volumes" {
      for_each = length(var.cloud_sql_instances) == 0 ? [] : ["cloudsql"]
      content {
        name = "cloudsql"
        cloud_sql_instance {
          instances = var.cloud_sql_instances
        }
      }
    }

    # The collector's RunMonitoring document (what it scrapes), a Secret Manager secret mounted
    # as /etc/rungmp/config.yaml, the one path the sidecar reads.
    dynamic "volumes" {
      for_each = var.metrics_collector == null ? [] : [var.metrics_collector]
      content {
        name = "rungmp-config"
        secret {
          secret = volumes.value.config_secret
          items {
            version = "latest"
            path    = "config.yaml"
          }
        }
      }
    }

    containers {
      name  = var.container_name
      image = var.image
      args  = var.args

      ports {
        container_port = var.port
      }

      resources {
        limits = {
          cpu    = var.cpu
          memory = var.memory
        }
        cpu_idle          = var.cpu_idle
        startup_cpu_boost = var.startup_cpu_boost
      }

      dynamic "env" {
        for_each = var.env_vars
        content {
          name  = env.key
          value = env.value
        }
      }

      dynamic "env" {
        for_each = var.secrets
        content {
          name = env.key
          value_source {
            secret_key_ref {
              secret  = env.value.secret
              version = env.value.version
            }
          }
        }
      }

      dynamic "volume_mounts" {
        for_each = length(var.cloud_sql_instances) == 0 ? [] : ["cloudsql"]
        content {
          name       = "cloudsql"
          mount_path = "/cloudsql"
        }
      }

      dynamic "startup_probe" {
        for_each = var.health_path == null ? [] : [var.health_path]
        content {
          initial_delay_seconds = 0
          period_seconds        = 3
          timeout_seconds       = 2
          failure_threshold     = 20
          http_get {
            path = startup_probe.value
            port = var.port
          }
        }
      }

      dynamic "liveness_probe" {
        for_each = var.health_path == null ? [] : [var.health_path]
        content {
          period_seconds    = 15
          timeout_seconds   = 3
          failure_threshold = 3
          http_get {
            path = liveness_probe.value
            port = var.port
          }
        }
      }
    }

    # Managed Service for Prometheus collector: starts after the service's container, scrapes
    # what the RunMonitoring document names (e.g. 127.0.0.1:<admin port>/metrics) and writes to
    # Cloud Monitoring with the service's identity (roles/monitoring.metricWriter).
    dynamic "containers" {
      for_each = var.metrics_collector == null ? [] : [var.metrics_collector]
      content {
        name       = "metrics-collector"
        image      = containers.value.image
        depends_on = [var.container_name]
        resources {
          limits = {
            cpu    = containers.value.cpu
            memory = containers.value.memory
          }
        }
        volume_mounts {
          name       = "rungmp-config"
          mount_path = "/etc/rungmp"
        }
      }
    }
  }

  traffic {
    type    = "TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST"
    percent = 100
  }
}

resource "google_cloud_run_v2_service_iam_member" "invoker" {
  for_each = toset(var.invoker_members)

  project  = var.project_id
  location = var.region
  name     = google_cloud_run_v2_service.this.name
  role     = "roles/run.invoker"
  member   = each.value
}
