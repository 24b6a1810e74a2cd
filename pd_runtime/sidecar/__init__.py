"""The decode-side sidecar: runs the prefill → decode chain for one decode worker."""
