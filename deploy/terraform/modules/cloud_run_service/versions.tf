terraform {
  required_version = ">= 1.6"
  required_providers {
    # 6.0 added deletion_protection to google_cloud_run_v2_service, which main.tf sets.
    google = {
      source  = "hashicorp/google"
      version = ">= 6.0, < 7.0"
    }
  }
}
