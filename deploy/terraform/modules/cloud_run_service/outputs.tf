output "name" {
  value       = google_cloud_run_v2_service.this.name
  description = "Service name."
}

output "uri" {
  value       = google_cloud_run_v2_service.this.uri
  description = "The service's run.app URL."
}

output "id" {
  value = google_cloud_run_v2_service.this.id
}
