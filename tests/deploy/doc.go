// Package deploy tests the install assets against the daemon itself: the
// static manifests (deployments/static), the Helm chart
// (deployments/helm/gpu-plugin), the alerts and their promtool unit tests,
// the Grafana dashboard, the autoscaling examples (deployments/autoscaling:
// prometheus-adapter rules, HPA, KEDA ScaledObject, their queries evaluated
// in a real Prometheus), the Dockerfile and the references in README.md and docs/.
//
// It is a nested module so that Helm's Go library, k8s.io/api, the
// Prometheus Operator's types and Prometheus' PromQL parser stay out of the
// main module. Its non-test code renders the chart (RenderChart) and
// generates the static manifests from it (cmd/gen-static, `make manifests`).
//
//	cd tests/deploy && go test ./...    # or: make test-deploy
//
// The metric names the alerts and the dashboard may use come from /metrics
// of the whole daemon, run in process on simulated nodes against a stand-in
// kubelet and pod-resources API. promtool (Debian package prometheus) is
// needed for the rule checks; without it they skip.
package deploy
