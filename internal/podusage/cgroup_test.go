package podusage

import (
	"regexp"
	"strings"
	"testing"
)

const (
	testUID = "1b3f0f5e-6c3a-4c2e-9d7e-2b8a5c7d9e10"
	testCID = "0c2327a9231f4d7da919478738d285ef4ca6d218c74170e0bbb5a5a8e9505f80"
	// otherCID is a container ID that must not be picked: a kind node's
	// own container, or a container nested in the workload's.
	otherCID = "3924d11e25c10dd0144aeb13b861008ec034c9a9911989f34db9819d617ac827"
)

// testUIDSystemd is testUID as kubelet writes it in systemd unit names.
var testUIDSystemd = strings.ReplaceAll(testUID, "-", "_")

type cgroupCase struct {
	name string
	data string
	want Owner
	ok   bool
}

// cgroupCases are /proc/<pid>/cgroup contents of every layout ParseCgroup
// knows, and of processes in no pod; FuzzParseCgroup seeds from them too.
var cgroupCases = []cgroupCase{
	// cgroup v2, systemd driver
	{"systemd burstable containerd",
		"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + testUIDSystemd + ".slice/cri-containerd-" + testCID + ".scope\n",
		Owner{testUID, testCID}, true},
	{"systemd besteffort containerd",
		"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + testUIDSystemd + ".slice/cri-containerd-" + testCID + ".scope\n",
		Owner{testUID, testCID}, true},
	{"systemd guaranteed (no QoS level)",
		"0::/kubepods.slice/kubepods-pod" + testUIDSystemd + ".slice/cri-containerd-" + testCID + ".scope\n",
		Owner{testUID, testCID}, true},
	{"systemd CRI-O",
		"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + testUIDSystemd + ".slice/crio-" + testCID + ".scope\n",
		Owner{testUID, testCID}, true},
	{"systemd CRI-O conmon is the pod's, not a container's",
		"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + testUIDSystemd + ".slice/crio-conmon-" + testCID + ".scope\n",
		Owner{testUID, ""}, true},
	{"systemd docker (cri-dockerd)",
		"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + testUIDSystemd + ".slice/docker-" + testCID + ".scope\n",
		Owner{testUID, testCID}, true},
	{"systemd pod cgroup itself (no container scope)",
		"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + testUIDSystemd + ".slice\n",
		Owner{testUID, ""}, true},
	{"container's own sub-cgroup",
		"0::/kubepods.slice/kubepods-pod" + testUIDSystemd + ".slice/cri-containerd-" + testCID + ".scope/init.scope/docker-" + otherCID + ".scope\n",
		Owner{testUID, testCID}, true},
	{"removed cgroup (zombie)",
		"0::/kubepods.slice/kubepods-pod" + testUIDSystemd + ".slice/cri-containerd-" + testCID + ".scope (deleted)\n",
		Owner{testUID, testCID}, true},
	{"no trailing newline",
		"0::/kubepods.slice/kubepods-pod" + testUIDSystemd + ".slice/cri-containerd-" + testCID + ".scope",
		Owner{testUID, testCID}, true},

	// cgroupfs driver
	{"cgroupfs burstable",
		"0::/kubepods/burstable/pod" + testUID + "/" + testCID + "\n",
		Owner{testUID, testCID}, true},
	{"cgroupfs besteffort",
		"0::/kubepods/besteffort/pod" + testUID + "/" + testCID + "\n",
		Owner{testUID, testCID}, true},
	{"cgroupfs guaranteed",
		"0::/kubepods/pod" + testUID + "/" + testCID + "\n",
		Owner{testUID, testCID}, true},
	{"cgroupfs CRI-O",
		"0::/kubepods/burstable/pod" + testUID + "/crio-" + testCID + "\n",
		Owner{testUID, testCID}, true},
	{"cgroupfs pod cgroup itself",
		"0::/kubepods/burstable/pod" + testUID + "\n",
		Owner{testUID, ""}, true},
	{"kubelet on systemd, runtime on cgroupfs (slice:prefix:id as one directory)",
		"0::/system.slice/containerd.service/kubepods-burstable-pod" + testUIDSystemd + ".slice:cri-containerd:" + testCID + "\n",
		Owner{testUID, testCID}, true},

	// seen from elsewhere: cgroup namespaces, nested managers
	{"cgroup namespace ../ prefix",
		"0::/../../kubepods-besteffort-pod" + testUIDSystemd + ".slice/cri-containerd-" + testCID + ".scope\n",
		Owner{testUID, testCID}, true},
	{"kind node (kubelet.slice nesting, node container before the pod)",
		"0::/system.slice/docker-" + otherCID + ".scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod" + testUIDSystemd + ".slice/cri-containerd-" + testCID + ".scope\n",
		Owner{testUID, testCID}, true},
	{"nested under containerd.service",
		"0::/system.slice/containerd.service/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + testUIDSystemd + ".slice/cri-containerd-" + testCID + ".scope\n",
		Owner{testUID, testCID}, true},
	{"kubelet in a pod: the innermost pod owns",
		"0::/kubepods/pod" + strings.Replace(testUID, "1b3f", "9999", 1) + "/" + otherCID + "/kubepods/besteffort/pod" + testUID + "/" + testCID + "\n",
		Owner{testUID, testCID}, true},

	// cgroup v1 and hybrid: many lines
	{"v1 cgroupfs, every line",
		"12:hugetlb:/kubepods/burstable/pod" + testUID + "/" + testCID + "\n" +
			"11:memory:/kubepods/burstable/pod" + testUID + "/" + testCID + "\n" +
			"10:cpu,cpuacct:/kubepods/burstable/pod" + testUID + "/" + testCID + "\n" +
			"4:pids:/kubepods/burstable/pod" + testUID + "/" + testCID + "\n" +
			"1:name=systemd:/kubepods/burstable/pod" + testUID + "/" + testCID + "\n",
		Owner{testUID, testCID}, true},
	{"hybrid, only some lines name the pod",
		"13:rdma:/\n" +
			"12:misc:/\n" +
			"11:devices:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + testUIDSystemd + ".slice/cri-containerd-" + testCID + ".scope\n" +
			"10:net_cls,net_prio:/\n" +
			"9:memory:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + testUIDSystemd + ".slice/cri-containerd-" + testCID + ".scope\n" +
			"2:cpuset:/\n" +
			"1:name=systemd:/system.slice/containerd.service\n" +
			"0::/\n",
		Owner{testUID, testCID}, true},
	{"hybrid, a line with the container wins over a pod-only line",
		"5:pids:/kubepods/besteffort/pod" + testUID + "\n" +
			"4:memory:/\n" +
			"3:cpu:/kubepods/besteffort/pod" + testUID + "/" + testCID + "\n" +
			"0::/\n",
		Owner{testUID, testCID}, true},

	// processes in no pod, and input that is no cgroup file
	{"host service", "0::/system.slice/sshd.service\n", Owner{}, false},
	{"host, hybrid", "4:pids:/user.slice/user-0.slice\n1:name=systemd:/user.slice\n0::/user.slice\n", Owner{}, false},
	{"root cgroup", "0::/\n", Owner{}, false},
	{"kubepods but no pod (a QoS slice)", "0::/kubepods.slice/kubepods-burstable.slice\n", Owner{}, false},
	{"empty", "", Owner{}, false},
	{"blank lines", "\n\n\n", Owner{}, false},
	{"garbage", "\x00\xff\xfe pod pod- ::: //// \n::::\n", Owner{}, false},
	{"path without the hierarchy fields", "/kubepods/pod" + testUID + "/" + testCID + "\n", Owner{}, false},
	{"pod with a non-UUID UID", "0::/kubepods/burstable/podnot-a-uid-at-all-just-text-here-xx/" + testCID + "\n", Owner{}, false},
	{"static pod UID (the kubelet's 32-hex manifest hash)",
		"0::/kubepods/burstable/pod" + strings.ReplaceAll(testUID, "-", "") + "/" + testCID + "\n",
		Owner{PodUID: strings.ReplaceAll(testUID, "-", ""), ContainerID: testCID}, true},
	{"static pod UID, systemd",
		"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + strings.ReplaceAll(testUID, "-", "") + ".slice/cri-containerd-" + testCID + ".scope\n",
		Owner{PodUID: strings.ReplaceAll(testUID, "-", ""), ContainerID: testCID}, true},
	{"33 hex is neither", "0::/kubepods/pod" + strings.ReplaceAll(testUID, "-", "") + "a/" + testCID + "\n", Owner{}, false},
	{"uppercase UID",
		"0::/kubepods/burstable/pod" + strings.ToUpper(testUID) + "/" + testCID + "\n", Owner{}, false},
	{"UID with a separator out of place",
		"0::/kubepods/burstable/pod1b3f0f5e6-c3a-4c2e-9d7e-2b8a5c7d9e10/" + testCID + "\n", Owner{}, false},
	{"one hex digit too many",
		"0::/kubepods/burstable/pod" + testUID + "0\n", Owner{}, false},
	{"'pod' glued to another word",
		"0::/kubepods.slice/kubepodspod" + testUIDSystemd + ".slice\n", Owner{}, false},
	{"container ID one digit short: pod only",
		"0::/kubepods/burstable/pod" + testUID + "/" + testCID[1:] + "\n", Owner{testUID, ""}, true},
	{"container ID in uppercase: pod only",
		"0::/kubepods/burstable/pod" + testUID + "/" + strings.ToUpper(testCID) + "\n", Owner{testUID, ""}, true},
	{"unknown runtime prefix: pod only",
		"0::/kubepods.slice/kubepods-pod" + testUIDSystemd + ".slice/libpod-" + testCID + ".scope\n", Owner{testUID, ""}, true},
}

func TestParseCgroup(t *testing.T) {
	for _, tc := range cgroupCases {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := ParseCgroup([]byte(tc.data))
			if got != tc.want || ok != tc.ok {
				t.Errorf("ParseCgroup(%q)\n = %+v, %v\nwant %+v, %v", tc.data, got, ok, tc.want, tc.ok)
			}
		})
	}
}

var (
	canonicalUIDRE = regexp.MustCompile(`^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32})$`)
	runtimeIDRE    = regexp.MustCompile(`^[0-9a-f]{64}$`)
)

// FuzzParseCgroup checks that no input panics and that every answer is
// well formed: a canonical UID (or a static pod's) and an empty or 64-hex
// container ID.
func FuzzParseCgroup(f *testing.F) {
	for _, tc := range cgroupCases {
		f.Add([]byte(tc.data))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		got, ok := ParseCgroup(data)
		if !ok {
			if got != (Owner{}) {
				t.Fatalf("ParseCgroup(%q) = %+v with ok=false", data, got)
			}
			return
		}
		if !canonicalUIDRE.MatchString(got.PodUID) {
			t.Fatalf("ParseCgroup(%q): PodUID %q is neither a canonical UUID nor a static pod's 32-hex UID", data, got.PodUID)
		}
		if got.ContainerID != "" && !runtimeIDRE.MatchString(got.ContainerID) {
			t.Fatalf("ParseCgroup(%q): ContainerID %q is not 64 hex digits", data, got.ContainerID)
		}
	})
}
