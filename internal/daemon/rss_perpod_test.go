package daemon_test

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// BenchmarkDaemonRSSPerPod is BenchmarkDaemonRSS with per-pod accounting
// on: each of the 100 pods runs a real process in a real pod cgroup made
// by the benchmark (root), registered on its MIG device through /sim, and
// the daemon names the pods from a stand-in API server's pod list.
//
//	go test -run '^$' -bench DaemonRSSPerPod -benchtime 1x ./internal/daemon/
func BenchmarkDaemonRSSPerPod(b *testing.B) {
	bin, profile, secs := rssSetup(b)
	migs := migUUIDs(b, migNode)
	for b.Loop() {
		cgroups := testkit.PodCgroups(b, testkit.Cgroupfs)
		var pods []map[string]any
		procs := map[int][]map[string]any{} // by GPU index
		for i := range 100 {
			uid, cid := testkit.RandomPodUID(b), testkit.RandomContainerID(b)
			pid := cgroups.Add(uid, cid)
			pods = append(pods, map[string]any{
				"metadata": map[string]any{"name": fmt.Sprintf("job-%03d-0", i), "namespace": fmt.Sprintf("team-%d", i%7), "uid": uid},
				"status": map[string]any{"phase": "Running",
					"containerStatuses": []any{map[string]any{"name": "main", "containerID": "containerd://" + cid}}},
			})
			// The node's MIG devices are 7 per GPU, in GPU order.
			mig := i % len(migs)
			procs[mig/7] = append(procs[mig/7], map[string]any{"pid": pid, "used_mib": 100 + i, "mig": migs[mig]})
		}
		api := httptest.NewServer(podList(b, pods))
		kubeconfig := filepath.Join(b.TempDir(), "kubeconfig")
		if err := os.WriteFile(kubeconfig, []byte(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "`+api.URL+`"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
`), 0o600); err != nil {
			b.Fatal(err)
		}
		daemonRSS(b, bin, profile, secs, &rssOptions{
			args: []string{"--per-pod-usage", "--kubeconfig=" + kubeconfig},
			started: func(base string) {
				for gpu, list := range procs {
					body, _ := json.Marshal(list)
					put(b, fmt.Sprintf("%s/sim/gpus/%d/processes", base, gpu), string(body))
				}
			},
			attributed: func(body string) bool {
				return strings.Count(body, "gpu_plugin_pod_gpu_processes{") == 100 && !strings.Contains(body, "gpu_plugin_gpu_unattributed_processes{")
			},
		})
		api.Close()
	}
}

// podList is a stand-in API server that lists pods and holds each watch
// open without events.
func podList(b *testing.B, pods []map[string]any) http.Handler {
	list, err := json.Marshal(map[string]any{"kind": "PodList", "apiVersion": "v1", "metadata": map[string]any{"resourceVersion": "1"}, "items": pods})
	if err != nil {
		b.Fatal(err)
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path != "/api/v1/pods":
			w.WriteHeader(http.StatusNotFound)
			io.WriteString(w, `{"kind":"Status","code":404,"reason":"NotFound"}`)
		case r.URL.Query().Get("watch") == "true":
			w.WriteHeader(http.StatusOK)
			w.(http.Flusher).Flush()
			<-r.Context().Done()
		default:
			w.Write(list)
		}
	})
}
