package daemon_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	podresourcesv1 "k8s.io/kubelet/pkg/apis/podresources/v1"

	"github.com/gpu-plugin/gpu-plugin/internal/fakekubelet"
	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/podresources"
	fake "github.com/gpu-plugin/gpu-plugin/internal/podresources/fakepodresources"
	"github.com/gpu-plugin/gpu-plugin/internal/sim"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
	"github.com/gpu-plugin/gpu-plugin/internal/testkit"
)

// migNode is the benchmark node: 8 A100s with 7 MIG devices each.
const migNode = "../telemetry/testdata/dgx-a100-56mig.yaml"

// hundredPods is 100 pods' devices over the node's 56 MIG devices (44 of
// them time-sliced by two pods), with replica IDs.
func hundredPods(t testing.TB, migUUIDs []string) []*fake.Devices {
	t.Helper()
	var out []*fake.Devices
	for i := range 100 {
		id := migUUIDs[i%len(migUUIDs)] + "::" + strconv.Itoa(i/len(migUUIDs))
		out = append(out, &fake.Devices{Resource: "nvidia.com/mig-1g.5gb", IDs: []string{id}})
	}
	return out
}

func servePods(srv *fake.Server, devs []*fake.Devices) {
	var pods []*podresourcesv1.PodResources
	for i, d := range devs {
		pods = append(pods, fake.Pod(fmt.Sprintf("team-%d", i%7), fmt.Sprintf("job-%03d-0", i), fake.Container{Name: "main", Devices: []fake.Devices{*d}}))
	}
	srv.SetPods(pods...)
}

// migUUIDs lists a profile's MIG devices as the daemon will see them.
func migUUIDs(t testing.TB, profile string) []string {
	t.Helper()
	p, err := sim.LoadProfile(profile)
	if err != nil {
		t.Fatal(err)
	}
	lib, err := nvml.Open(sim.NewNode(p, nil).NVML())
	if err != nil {
		t.Fatal(err)
	}
	defer lib.Close()
	inv, err := nvml.Scan(lib, nvml.ScanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, g := range inv.GPUs {
		for _, m := range g.MIGDevices {
			out = append(out, m.UUID)
		}
	}
	return out
}

// BenchmarkDaemonScrape is a whole /metrics request to the daemon in this
// process over loopback HTTP: the 56-MIG node with 100 attributed pods
// (every family: Go and process collectors, health, reloads, telemetry).
// The sampler runs at its default 1 s meanwhile.
//
//	go test -run '^$' -bench DaemonScrape ./internal/daemon/
func BenchmarkDaemonScrape(b *testing.B) {
	for _, gz := range []bool{false, true} {
		b.Run(fmt.Sprintf("gzip=%v", gz), func(b *testing.B) {
			srv, socket := podResources(b)
			servePods(srv, hundredPods(b, migUUIDs(b, migNode)))
			r := start(b, true, "--simulate="+migNode, "--mig-strategy=mixed", "--pod-resources-socket="+socket)
			waitSample(b, r.d, "a sample", func(*telemetry.Snapshot) bool { return true })
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := r.d.PodAttribution().WaitFor(ctx, func(s *podresources.Snapshot, _ podresources.Status) bool { return s.Containers == 100 }); err != nil {
				b.Fatal(err)
			}
			client := &http.Client{Transport: &http.Transport{DisableCompression: true}}
			req, _ := http.NewRequest(http.MethodGet, "http://"+r.d.Addr()+"/metrics", nil)
			if gz {
				req.Header.Set("Accept-Encoding", "gzip")
			}
			scrape := func() int {
				resp, err := client.Do(req)
				if err != nil {
					b.Fatal(err)
				}
				n, _ := io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				return int(n)
			}
			size := scrape()
			lat := make([]time.Duration, 0, 1024)
			b.ResetTimer()
			for b.Loop() {
				start := time.Now()
				scrape()
				lat = append(lat, time.Since(start))
			}
			b.StopTimer()
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
			b.ReportMetric(float64(size), "bytes/scrape")
		})
	}
}

// BenchmarkDaemonRSS builds the gpu-plugin binary, runs it on the 56-MIG
// node against a stand-in kubelet and 100 attributed pods, scrapes
// /metrics every 100 ms for TELEMETRY_RSS_SECONDS (default 20) and reports
// the process's VmRSS and VmHWM from /proc.
//
//	go test -run '^$' -bench DaemonRSS -benchtime 1x ./internal/daemon/
func BenchmarkDaemonRSS(b *testing.B) {
	bin, profile, secs := rssSetup(b)
	for b.Loop() {
		daemonRSS(b, bin, profile, secs, nil)
	}
}

// rssSetup builds the binary and reads the benchmark's settings.
func rssSetup(b *testing.B) (bin, profile string, secs int) {
	bin = buildDaemon(b)
	secs = 20
	if s, err := strconv.Atoi(os.Getenv("TELEMETRY_RSS_SECONDS")); err == nil && s > 0 {
		secs = s
	}
	profile, err := filepath.Abs(migNode)
	if err != nil {
		b.Fatal(err)
	}
	return bin, profile, secs
}

// buildDaemon builds the gpu-plugin binary for a benchmark that runs it as
// its own process (skipped without the go command).
func buildDaemon(b *testing.B) string {
	goBin, err := exec.LookPath("go")
	if err != nil {
		b.Skip("needs the go command to build the binary")
	}
	bin := filepath.Join(b.TempDir(), "gpu-plugin")
	if out, err := exec.Command(goBin, "build", "-o", bin, "../../cmd/gpu-plugin").CombinedOutput(); err != nil {
		b.Fatalf("building: %v\n%s", err, out)
	}
	return bin
}

// startDaemon runs the binary with args; stop interrupts it and waits (a
// kill after 10 s).
func startDaemon(b *testing.B, bin string, args ...string) (cmd *exec.Cmd, logs *testkit.Buffer, stop func()) {
	cmd = exec.Command(bin, args...)
	logs = &testkit.Buffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	return cmd, logs, func() {
		_ = cmd.Process.Signal(os.Interrupt)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	}
}

// rssOptions are what a variant of the RSS benchmark adds: flags, work
// once the daemon serves (metrics is its /metrics URL, base its /sim
// base), and what a scrape must show before it counts as attributed.
type rssOptions struct {
	args       []string
	started    func(base string)
	attributed func(body string) bool
}

// daemonRSS runs the binary once and reports its memory.
func daemonRSS(b *testing.B, bin, profile string, secs int, o *rssOptions) {
	if o == nil {
		o = &rssOptions{}
	}
	if o.attributed == nil {
		o.attributed = func(body string) bool { return strings.Count(body, "gpu_plugin_pod_gpu_info{") == 100 }
	}
	srv, socket := podResources(b)
	servePods(srv, hundredPods(b, migUUIDs(b, migNode)))
	kdir := socketDir(b)
	k, err := fakekubelet.Start(kdir, nil)
	if err != nil {
		b.Fatal(err)
	}
	addr := freeLoopbackAddr(b)
	args := append([]string{"--simulate=" + profile, "--mig-strategy=mixed", "--kubelet-socket-dir=" + kdir,
		"--metrics-address=" + addr, "--pod-resources-socket=" + socket, "--node-labels=false", "--node-name=bench"}, o.args...)
	cmd, logs, stopDaemon := startDaemon(b, bin, args...)
	stop := func() {
		stopDaemon()
		k.Stop()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	if err := k.WaitForAllocatable(ctx, "nvidia.com/mig-1g.5gb", 56, 56); err != nil {
		cancel()
		stop()
		b.Fatalf("the daemon did not register: %v\n%s", err, logs.String())
	}
	cancel()
	if o.started != nil {
		o.started("http://" + addr)
	}
	deadline := time.Now().Add(time.Duration(secs) * time.Second)
	scrapes, attributed := 0, false
	for time.Now().Before(deadline) {
		_, body := get(b, "http://"+addr+"/metrics")
		attributed = attributed || o.attributed(body)
		scrapes++
		time.Sleep(100 * time.Millisecond)
	}
	rss, hwm := procStatus(b, cmd.Process.Pid, "VmRSS"), procStatus(b, cmd.Process.Pid, "VmHWM")
	stop()
	if !attributed {
		b.Errorf("the daemon never served the 100 pods attributed\n%s", logs.String())
	}
	b.ReportMetric(rss/1024, "VmRSS-MB")
	b.ReportMetric(hwm/1024, "VmHWM-MB")
	b.ReportMetric(float64(scrapes), "scrapes")
}

// procStatus reads a kB field of /proc/<pid>/status.
func procStatus(b *testing.B, pid int, field string) float64 {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), field+":"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 64)
			if err != nil {
				b.Fatal(err)
			}
			return kb
		}
	}
	b.Fatalf("%s not in /proc/%d/status", field, pid)
	return 0
}
