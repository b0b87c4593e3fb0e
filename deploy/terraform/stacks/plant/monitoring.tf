# Observability of the gateway on Google Cloud (README → Observability):
# - the metrics collection path: a Managed Service for Prometheus sidecar in every gateway
#   instance scrapes the admin listener (ADMIN_PORT, loopback only) and writes to Cloud
#   Monitoring; what it scrapes is the RunMonitoring document below, mounted from Secret Manager;
# - alert policies on those metrics (PromQL), the same alerts as
#   deploy/prometheus/plant-gateway-alerts.yaml scoped to this environment's gateway (job label);
# - an uptime check of the public /health through the load balancer, with its alert policy.

locals {
  # the Prometheus job label of this environment's gateway (RunMonitoring jobName)
  metrics_job = local.gateway_name
  run_monitoring = yamlencode({
    apiVersion = "monitoring.googleapis.com/v1beta"
    kind       = "RunMonitoring"
    metadata   = { name = local.gateway_name }
    spec = {
      endpoints = [{
        port     = var.gateway_admin_port
        path     = "/metrics"
        interval = var.metrics_scrape_interval
        jobName  = local.metrics_job
      }]
      targetLabels = { metadata = ["instance", "revision", "service"] }
    }
  })
  # alert name => severity, summary, how long the condition holds, PromQL over this job
  alerts = {
    PlantGateway5xxRatio = {
      severity = "critical"
      summary  = "More than 5 % of the gateway's answers are 5xx"
      for      = "300s"
      query    = "sum(rate(plant_gateway_requests_total{job=\"${local.metrics_job}\",status=~\"5..\"}[5m])) / sum(rate(plant_gateway_requests_total{job=\"${local.metrics_job}\"}[5m])) > 0.05"
    }
    PlantGatewayP99Latency = {
      severity = "warning"
      summary  = "The gateway's p99 latency is above 2 s"
      for      = "600s"
      query    = "histogram_quantile(0.99, sum by (le) (rate(plant_gateway_request_duration_seconds_bucket{job=\"${local.metrics_job}\"}[5m]))) > 2"
    }
    PlantGatewayOverheadP99 = {
      severity = "warning"
      summary  = "The time the gateway itself adds is above 250 ms at p99"
      for      = "600s"
      query    = "histogram_quantile(0.99, sum by (le) (rate(plant_gateway_overhead_seconds_bucket{job=\"${local.metrics_job}\"}[5m]))) > 0.25"
    }
    PlantGatewayAuditRowsLost = {
      severity = "critical"
      summary  = "Audit rows were lost (neither written, queued nor spooled)"
      for      = "0s"
      query    = "sum(increase(plant_gateway_audit_rows_lost_total{job=\"${local.metrics_job}\"}[10m])) > 0"
    }
    PlantGatewayAuditRefusing = {
      severity = "critical"
      summary  = "Requests are refused with 503 audit-unavailable"
      for      = "60s"
      query    = "max(plant_gateway_audit_refusing{job=\"${local.metrics_job}\"}) > 0"
    }
    PlantGatewayAuditBacklog = {
      severity = "warning"
      summary  = "Audit rows have waited on the disk spool for 15 minutes"
      for      = "900s"
      query    = "sum(plant_gateway_audit_spool_pending_rows{job=\"${local.metrics_job}\"}) > 0"
    }
    PlantGatewayAuditQueueNearlyFull = {
      severity = "warning"
      summary  = "The in-memory audit queue is above 80 % of AUDIT_QUEUE_MAX"
      for      = "300s"
      query    = "sum(plant_gateway_audit_queue_depth{job=\"${local.metrics_job}\"}) / sum(plant_gateway_audit_queue_capacity_rows{job=\"${local.metrics_job}\"}) > 0.8"
    }
    PlantGatewayAuditRedisSpoolNearlyFull = {
      severity = "warning"
      summary  = "The shared Redis audit spool is above 80 % of its row cap"
      for      = "300s"
      query    = "max(plant_gateway_audit_redis_spool_rows{job=\"${local.metrics_job}\"}) / max(plant_gateway_audit_redis_spool_capacity_rows{job=\"${local.metrics_job}\"}) > 0.8"
    }
    PlantGatewayAuditRedisSpoolVanished = {
      severity = "critical"
      summary  = "Audit rows waiting in Redis vanished (Redis restarted empty or was flushed)"
      for      = "0s"
      query    = "sum(increase(plant_gateway_audit_redis_spool_vanished_rows_total{job=\"${local.metrics_job}\"}[10m])) > 0"
    }
    PlantGatewayAuditDatabaseDown = {
      severity = "warning"
      summary  = "The audit database does not take rows (rows go to the disk spool)"
      for      = "300s"
      query    = "min(plant_gateway_audit_database_up{job=\"${local.metrics_job}\"}) == 0"
    }
    PlantGatewayCircuitOpen = {
      severity = "critical"
      summary  = "The circuit breaker of upstream an upstream opened"
      for      = "0s"
      query    = "max by (upstream) (plant_gateway_circuit_state{job=\"${local.metrics_job}\"}) >= 2 or sum by (upstream) (increase(plant_gateway_circuit_opened_total{job=\"${local.metrics_job}\"}[5m])) > 0"
    }
    PlantGatewayBudgetCritical = {
      severity = "critical"
      summary  = "A budget reached its critical threshold"
      for      = "0s"
      query    = "sum(increase(plant_gateway_budget_alerts_total{job=\"${local.metrics_job}\",level=\"critical\"}[10m])) > 0"
    }
  }
}

# --- collection -------------------------------------------------------------------------------

resource "google_secret_manager_secret" "run_monitoring" {
  count = var.enable_metrics_collector ? 1 : 0

  project   = var.project_id
  secret_id = "plant-gateway-run-monitoring-${local.suffix}"
  labels    = local.labels
  replication {
    auto {}
  }
}

resource "google_secret_manager_secret_version" "run_monitoring" {
  count = var.enable_metrics_collector ? 1 : 0

  secret      = google_secret_manager_secret.run_monitoring[0].id
  secret_data = local.run_monitoring
}

resource "google_secret_manager_secret_iam_member" "gateway_run_monitoring" {
  count = var.enable_metrics_collector ? 1 : 0

  project   = var.project_id
  secret_id = google_secret_manager_secret.run_monitoring[0].secret_id
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${google_service_account.gateway.email}"
}

# The sidecar writes with the service's identity.
resource "google_project_iam_member" "gateway_metric_writer" {
  count = var.enable_metrics_collector ? 1 : 0

  project = var.project_id
  role    = "roles/monitoring.metricWriter"
  member  = "serviceAccount:${google_service_account.gateway.email}"
}

# --- alerts -----------------------------------------------------------------------------------

resource "google_monitoring_alert_policy" "gateway" {
  for_each = var.enable_metrics_collector ? local.alerts : {}

  project               = var.project_id
  display_name          = "${each.key} (${local.gateway_name})"
  combiner              = "OR"
  severity              = upper(each.value.severity)
  notification_channels = var.alert_notification_channels
  user_labels           = local.labels

  conditions {
    display_name = each.value.summary
    condition_prometheus_query_language {
      query               = each.value.query
      duration            = each.value.for
      evaluation_interval = "60s"
    }
  }

  documentation {
    content   = "${each.value.summary}. Runbook: README → Observability (alerts) and the Plant Gateway dashboard (deploy/grafana/plant-gateway.json)."
    mime_type = "text/markdown"
  }
}

# --- uptime -----------------------------------------------------------------------------------

resource "google_monitoring_uptime_check_config" "gateway_health" {
  project      = var.project_id
  display_name = "${local.gateway_name} /health"
  timeout      = "10s"
  period       = "60s"

  http_check {
    path           = "/health"
    port           = 443
    use_ssl        = true
    validate_ssl   = true
    request_method = "GET"
  }

  monitored_resource {
    type = "uptime_url"
    labels = {
      project_id = var.project_id
      host       = var.domains[0]
    }
  }

  content_matchers {
    content = "\"status\":\"healthy\""
    matcher = "CONTAINS_STRING"
  }
}

resource "google_monitoring_alert_policy" "gateway_uptime" {
  project               = var.project_id
  display_name          = "PlantGatewayDown (${local.gateway_name})"
  combiner              = "OR"
  severity              = "CRITICAL"
  notification_channels = var.alert_notification_channels
  user_labels           = local.labels

  conditions {
    display_name = "/health fails from more than one region"
    condition_threshold {
      filter          = "metric.type=\"monitoring.googleapis.com/uptime_check/check_passed\" AND resource.type=\"uptime_url\" AND metric.label.\"check_id\"=\"${google_monitoring_uptime_check_config.gateway_health.uptime_check_id}\""
      duration        = "120s"
      comparison      = "COMPARISON_GT"
      threshold_value = 1
      aggregations {
        alignment_period     = "60s"
        per_series_aligner   = "ALIGN_NEXT_OLDER"
        cross_series_reducer = "REDUCE_COUNT_FALSE"
        group_by_fields      = ["resource.label.*"]
      }
      trigger {
        count = 1
      }
    }
  }

  documentation {
    content   = "The public /health does not answer through the load balancer. Check the Cloud Run service's revisions and the gateway's started / dependency_down log lines."
    mime_type = "text/markdown"
  }
}
