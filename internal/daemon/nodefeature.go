package daemon

// --use-node-feature-api (GFD's useNodeFeatureAPI): the node labels go to
// an NFD NodeFeature object instead of the features.d file.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"strings"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/kube"
	"github.com/gpu-plugin/gpu-plugin/internal/labels"
)

// serviceAccountNamespace is where a pod finds its namespace.
const serviceAccountNamespace = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

// nodeFeatureWriter publishes the labels; the reloader's goroutine owns it.
type nodeFeatureWriter struct {
	client         *kube.Client
	namespace      string
	node, pod      string
	log            *slog.Logger
	owner          *kube.OwnerReference
	ownerLooked    bool
	last           labels.Labels // what was last written, nil before the first write
	lastWriteError string
}

func (d *Daemon) newNodeFeatureWriter() (*nodeFeatureWriter, error) {
	ns := d.cfg.Daemon.PodNamespace
	if ns == "" {
		b, err := os.ReadFile(serviceAccountNamespace)
		if err != nil {
			return nil, errors.New("--use-node-feature-api: the pod's namespace is unknown: set --pod-namespace or POD_NAMESPACE (the chart sets it from metadata.namespace)")
		}
		ns = strings.TrimSpace(string(b))
	}
	return &nodeFeatureWriter{client: d.kube, namespace: ns, node: d.cfg.Daemon.NodeName, pod: d.cfg.Daemon.PodName,
		log: d.log.With("component", "node-feature")}, nil
}

// write publishes l unless it equals what was last written (the GFD
// timestamp alone is no change); it reports whether it wrote.
func (w *nodeFeatureWriter) write(l labels.Labels) (bool, error) {
	if w.last != nil && maps.Equal(unstamped(w.last), unstamped(l)) {
		return false, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if !w.ownerLooked {
		w.owner = w.lookUpOwner(ctx)
	}
	name := kube.NodeFeatureName(w.node)
	wrote, err := w.client.ApplyNodeFeature(ctx, w.namespace, name, w.node, l, w.owner)
	if err != nil {
		return false, fmt.Errorf("%w (the chart's nodeFeatureAPI grants get, create and update on nodefeatures.nfd.k8s-sigs.io; NFD's CRDs must be installed)", err)
	}
	w.last = maps.Clone(l)
	return wrote, nil
}

// lookUpOwner finds the DaemonSet that controls the daemon's pod, so that
// removing the DaemonSet removes the NodeFeature, as with GFD. Without a
// pod name or on an error the object has no owner, said once.
func (w *nodeFeatureWriter) lookUpOwner(ctx context.Context) *kube.OwnerReference {
	if w.pod == "" {
		w.ownerLooked = true
		w.log.Info("NodeFeature without an owner: the pod name is unknown (--pod-name, POD_NAME); uninstalling leaves the object behind")
		return nil
	}
	pod, err := w.client.GetPod(ctx, w.namespace, w.pod)
	if err != nil {
		w.log.Warn("NodeFeature owner not found yet: reading the daemon's pod failed; retrying at the next write", "pod", w.namespace+"/"+w.pod, "err", err)
		return nil
	}
	w.ownerLooked = true
	if ref := kube.ControllerOf(&pod.ObjectMeta); ref != nil {
		return &kube.OwnerReference{APIVersion: ref.APIVersion, Kind: ref.Kind, Name: ref.Name, UID: ref.UID}
	}
	w.log.Info("NodeFeature without an owner: the daemon's pod has no controller", "pod", w.namespace+"/"+w.pod)
	return nil
}

func unstamped(l labels.Labels) labels.Labels {
	out := maps.Clone(l)
	delete(out, labels.TimestampKey)
	return out
}
