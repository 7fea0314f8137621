package podusage

import (
	"strings"
	"sync"
)

// Pod is what accounting knows of a pod on this node.
type Pod struct {
	UID, Namespace, Name string
	// Containers maps a container's runtime ID (no "containerd://"
	// scheme) to its name, init containers included.
	Containers map[string]string
	// Finished says the pod ran to completion or failed: its allocated
	// devices then get no zero series.
	Finished bool
}

// Directory is the node's pods by UID and by name, as the API server
// reports them (the daemon feeds it from a node-scoped watch). It is safe
// for concurrent use; a Pod, once stored, is never changed.
type Directory struct {
	mu     sync.RWMutex
	byUID  map[string]*Pod
	byName map[string]*Pod // namespace + "/" + name
	synced bool
}

// NewDirectory returns an empty directory.
func NewDirectory() *Directory {
	return &Directory{byUID: map[string]*Pod{}, byName: map[string]*Pod{}}
}

// Set adds or replaces a pod.
func (d *Directory) Set(p Pod) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if old := d.byUID[p.UID]; old != nil && old.Namespace+"/"+old.Name != p.Namespace+"/"+p.Name {
		d.forgetName(old)
	}
	d.byUID[p.UID] = &p
	d.byName[p.Namespace+"/"+p.Name] = &p
}

// Delete forgets a pod by UID. A newer pod of the same name (a
// StatefulSet's replacement) keeps its entry.
func (d *Directory) Delete(uid string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if old := d.byUID[uid]; old != nil {
		d.forgetName(old)
		delete(d.byUID, uid)
	}
}

func (d *Directory) forgetName(p *Pod) {
	if k := p.Namespace + "/" + p.Name; d.byName[k] != nil && d.byName[k].UID == p.UID {
		delete(d.byName, k)
	}
}

// MarkSynced records that the first full list has arrived: from then on
// a UID the directory lacks is not a pod of this node.
func (d *Directory) MarkSynced() {
	d.mu.Lock()
	d.synced = true
	d.mu.Unlock()
}

// Synced reports whether the first full list has arrived.
func (d *Directory) Synced() bool {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.synced
}

// ByUID finds a pod by UID.
func (d *Directory) ByUID(uid string) (*Pod, bool) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	p, ok := d.byUID[uid]
	return p, ok
}

// ByName finds a pod by namespace and name.
func (d *Directory) ByName(namespace, name string) (*Pod, bool) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	p, ok := d.byName[namespace+"/"+name]
	return p, ok
}

// Len is the number of pods known.
func (d *Directory) Len() int {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return len(d.byUID)
}

// ContainerID strips the runtime scheme from a container status's ID
// ("containerd://<id>", "cri-o://<id>") to the ID cgroups carry.
func ContainerID(statusID string) string {
	if _, id, ok := strings.Cut(statusID, "://"); ok {
		return id
	}
	return statusID
}
