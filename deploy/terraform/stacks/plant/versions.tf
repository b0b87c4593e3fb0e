terraform {
  required_version = ">= 1.6"
  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 6.0, < 7.0"
    }
  }
  # State per environment: terraform init -backend-config="prefix=env/<environment>/plant"
  backend "gcs" {
    bucket = "waooaw-terraform-state-prod"
  }
}

provider "google" {
  project = var.project_id
  region  = var.region
}
