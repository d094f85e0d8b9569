"""Development and test harness: the hermetic cluster, the exec node, a loopback S3."""
