"""Running fineray runs on a cluster: Ray Jobs submission, following and stopping (`jobs`), KubeRay manifests
rendered from a run config and validated offline (`k8s`). Above train in the dependency order; the ground
floor (storage, starting or joining Ray) is `fineray.base`."""
