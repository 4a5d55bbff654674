"""Load generators and reports (``clipserve loadtest``) and the side-by-side benchmark."""
