output "gateway_url" {
  value       = "https://${var.domains[0]}"
  description = "Public URL (through the load balancer); pass it to plant-gateway verify --url."
}

output "gateway_run_url" {
  value       = module.plant_gateway.uri
  description = "The gateway's run.app URL (ingress limited to the load balancer)."
}

output "load_balancer_ip" {
  value       = google_compute_global_address.plant.address
  description = "Point the DNS A records of var.domains here."
}

output "backend_url" {
  value = module.plant_backend.uri
}

output "opa_url" {
  value = module.opa.uri
}

output "redis_host" {
  value = google_redis_instance.plant.host
}
