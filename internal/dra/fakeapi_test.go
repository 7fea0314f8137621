package dra_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"sort"
	"strconv"
	"sync"

	"github.com/gpu-plugin/gpu-plugin/internal/kube"
	"github.com/gpu-plugin/gpu-plugin/internal/notify"
)

// fakeAPI is an in-memory API server for the driver's unit tests: claims
// to read, slices stored with resourceVersions and generateName, and a
// watch. tests/kubelet runs the driver against the real kubelet and an API
// built from k8s.io/api's types; this one checks the driver's own logic.
type fakeAPI struct {
	mu         sync.Mutex
	claims     map[string]*kube.ResourceClaim // ns/name
	slices     map[string]*kube.ResourceSlice
	rv         int
	dropTaints bool // as an API server without DRADeviceTaints
	writes     int
	changed    notify.Signal
}

func newFakeAPI() *fakeAPI {
	return &fakeAPI{claims: map[string]*kube.ResourceClaim{}, slices: map[string]*kube.ResourceSlice{}}
}

func notFound(what string) error {
	return &kube.StatusError{Code: http.StatusNotFound, Message: what + " not found"}
}

func clone[T any](v *T) *T {
	b, _ := json.Marshal(v)
	out := new(T)
	_ = json.Unmarshal(b, out)
	return out
}

func (f *fakeAPI) GetResourceClaim(_ context.Context, ns, name string) (*kube.ResourceClaim, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c, ok := f.claims[ns+"/"+name]
	if !ok {
		return nil, notFound("resourceclaims " + name)
	}
	return clone(c), nil
}

func (f *fakeAPI) ListResourceSlices(_ context.Context, driver, node string) ([]kube.ResourceSlice, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []kube.ResourceSlice
	for _, s := range f.slices {
		if s.Spec.Driver == driver && s.Spec.NodeName == node {
			out = append(out, *clone(s))
		}
	}
	return out, nil
}

func (f *fakeAPI) store(s *kube.ResourceSlice) *kube.ResourceSlice {
	f.rv++
	f.writes++
	s = clone(s)
	s.ResourceVersion = strconv.Itoa(f.rv)
	if f.dropTaints {
		for i := range s.Spec.Devices {
			s.Spec.Devices[i].Taints = nil
		}
	}
	f.slices[s.Name] = s
	f.changed.Notify()
	return clone(s)
}

func (f *fakeAPI) CreateResourceSlice(_ context.Context, s *kube.ResourceSlice) (*kube.ResourceSlice, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	s = clone(s)
	if s.Name == "" {
		s.Name = fmt.Sprintf("%s%05d", s.GenerateName, f.rv+1)
	}
	s.UID = "uid-" + s.Name
	return f.store(s), nil
}

func (f *fakeAPI) UpdateResourceSlice(_ context.Context, s *kube.ResourceSlice) (*kube.ResourceSlice, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	cur, ok := f.slices[s.Name]
	if !ok {
		return nil, notFound("resourceslices " + s.Name)
	}
	if cur.ResourceVersion != s.ResourceVersion {
		return nil, &kube.StatusError{Code: http.StatusConflict, Message: "conflict"}
	}
	return f.store(s), nil
}

func (f *fakeAPI) DeleteResourceSlice(_ context.Context, name, uid string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if s, ok := f.slices[name]; ok && (uid == "" || s.UID == uid) {
		delete(f.slices, name)
		f.writes++
		f.changed.Notify()
	}
	return nil
}

// WatchResourceSlices calls onChange after every write, including the
// driver's own, as a watch does.
func (f *fakeAPI) WatchResourceSlices(ctx context.Context, _, _ string, _ *slog.Logger, onChange func(*kube.ResourceSlice)) {
	for {
		ch := f.changed.C()
		onChange(nil)
		for _, s := range f.all() {
			onChange(s)
		}
		select {
		case <-ctx.Done():
			return
		case <-ch:
		}
	}
}

func (f *fakeAPI) GetNode(_ context.Context, name string) (*kube.Node, error) {
	n := &kube.Node{}
	n.Name, n.UID = name, "node-uid-1"
	return n, nil
}

func (f *fakeAPI) all() []*kube.ResourceSlice {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []*kube.ResourceSlice
	for _, s := range f.slices {
		out = append(out, clone(s))
	}
	return out
}

// slice returns the one slice, or nil.
func (f *fakeAPI) slice() *kube.ResourceSlice {
	f.mu.Lock()
	defer f.mu.Unlock()
	var names []string
	for n := range f.slices {
		names = append(names, n)
	}
	sort.Strings(names)
	if len(names) != 1 {
		return nil
	}
	return clone(f.slices[names[0]])
}

func (f *fakeAPI) addClaim(c *kube.ResourceClaim) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.claims[c.Namespace+"/"+c.Name] = c
}

func (f *fakeAPI) deleteAll() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for n := range f.slices {
		delete(f.slices, n)
	}
	f.changed.Notify()
}
