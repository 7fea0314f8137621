package dcgmbackend

import (
	"errors"
	"fmt"
	"math"
	"strings"
	"sync"
	"time"

	"github.com/NVIDIA/go-dcgm/pkg/dcgm"
)

// DCGM's "no value" sentinels (dcgm_structs.h).
const (
	int64Blank = 0x7ffffffffffffff0
	fp64Blank  = 140737488355328.0
	// liveData asks for a value without a watch (DCGM_FV_FLAG_LIVE_DATA).
	liveData = 1
)

// goDCGM is the real Client: go-dcgm over cgo.
//
// Every method except Connect refuses to run unless Init succeeded: any
// go-dcgm call without a successful Init kills the process with a
// dynamic-linker error (symbol lookup error, exit 127) that cannot be
// recovered. Calls are serialised; go-dcgm keeps its handle in package
// state.
type goDCGM struct {
	address string // host:port or unix:///path; empty: embedded hostengine

	mu      sync.Mutex
	ready   bool
	cleanup func()
	groups  map[string]watch
}

type watch struct {
	group  dcgm.GroupHandle
	fields dcgm.FieldHandle
}

// NewClient returns the go-dcgm Client. address is a remote nv-hostengine
// ("host:5555" or "unix:///run/nvidia/dcgm.sock"); empty embeds the
// hostengine in this process (needs libdcgm.so.4, and a crash or OOM in it
// takes the daemon down, so a remote hostengine is preferable).
func NewClient(address string) Client {
	return &goDCGM{address: address, groups: map[string]watch{}}
}

var errNotConnected = errors.New("DCGM: not initialised")

func (c *goDCGM) Connect() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ready {
		return nil
	}
	var (
		cleanup func()
		err     error
	)
	switch {
	case c.address == "":
		cleanup, err = dcgm.Init(dcgm.Embedded)
	case strings.HasPrefix(c.address, "unix://"):
		cleanup, err = dcgm.Init(dcgm.Standalone, strings.TrimPrefix(c.address, "unix://"), "1")
	default:
		cleanup, err = dcgm.Init(dcgm.Standalone, c.address, "0")
	}
	if err != nil {
		where := "embedded (libdcgm.so.4)"
		if c.address != "" {
			where = "nv-hostengine at " + c.address
		}
		return fmt.Errorf("DCGM init, %s: %w", where, err)
	}
	c.ready, c.cleanup = true, cleanup
	c.groups = map[string]watch{}
	return nil
}

func (c *goDCGM) Disconnect() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.ready {
		return nil
	}
	c.ready = false
	for _, w := range c.groups {
		_ = dcgm.FieldGroupDestroy(w.fields)
		_ = dcgm.DestroyGroup(w.group)
	}
	c.groups = map[string]watch{}
	if c.cleanup != nil {
		c.cleanup() // dcgm.Shutdown, once per successful Init
	}
	return nil
}

func (c *goDCGM) GPUs() ([]GPU, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.ready {
		return nil, errNotConnected
	}
	ids, err := dcgm.GetSupportedDevices()
	if err != nil {
		return nil, classify(err)
	}
	if len(ids) == 0 {
		return nil, nil
	}
	// The UUID field, read live: GetDeviceInfo would also walk the
	// topology, a call known to crash inside libdcgm.
	pairs := make([]dcgm.GroupEntityPair, len(ids))
	for i, id := range ids {
		pairs[i] = dcgm.GroupEntityPair{EntityGroupId: dcgm.FE_GPU, EntityId: id}
	}
	uuidField := dcgm.Short(dcgm.DCGM_FI_DEV_UUID)
	vals, err := dcgm.EntitiesGetLatestValues(pairs, []dcgm.Short{uuidField}, liveData)
	if err != nil {
		return nil, classify(err)
	}
	var out []GPU
	for _, v := range vals {
		if v.Status != dcgm.DCGM_ST_OK || v.StringValue == nil {
			continue
		}
		out = append(out, GPU{ID: v.EntityID, UUID: *v.StringValue})
	}
	return out, nil
}

func (c *goDCGM) Instances() ([]Instance, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.ready {
		return nil, errNotConnected
	}
	h, err := dcgm.GetGPUInstanceHierarchy()
	if err != nil {
		return nil, classify(err)
	}
	var out []Instance
	for _, e := range h.EntityList[:min(int(h.Count), len(h.EntityList))] {
		if e.Entity.EntityGroupId != dcgm.FE_GPU_I {
			continue
		}
		out = append(out, Instance{ID: e.Entity.EntityId, GPUUUID: e.Info.GpuUuid, GPUInstanceID: int(e.Info.NvmlInstanceId)})
	}
	return out, nil
}

func (c *goDCGM) Watch(name string, entities []Entity, fields []uint16, interval time.Duration) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.ready {
		return errNotConnected
	}
	if old, ok := c.groups[name]; ok {
		_ = dcgm.FieldGroupDestroy(old.fields)
		_ = dcgm.DestroyGroup(old.group)
		delete(c.groups, name)
	}
	group, err := dcgm.CreateGroup(fmt.Sprintf("%s-%d", name, time.Now().UnixNano()))
	if err != nil {
		return classify(err)
	}
	for _, e := range entities {
		if err := dcgm.AddEntityToGroup(group, toGroup(e.Group), e.ID); err != nil {
			_ = dcgm.DestroyGroup(group)
			return classify(err)
		}
	}
	ids := make([]dcgm.Short, len(fields))
	for i, f := range fields {
		ids[i] = dcgm.Short(f)
	}
	fg, err := dcgm.FieldGroupCreate(fmt.Sprintf("%s-fields-%d", name, time.Now().UnixNano()), ids)
	if err != nil {
		_ = dcgm.DestroyGroup(group)
		return classify(err)
	}
	// Keep a few samples only: the exporter reads the latest value.
	keepAge := max(5*interval.Seconds(), 1)
	if err := dcgm.WatchFieldsWithGroupEx(fg, group, interval.Microseconds(), keepAge, 4); err != nil {
		_ = dcgm.FieldGroupDestroy(fg)
		_ = dcgm.DestroyGroup(group)
		return classify(err)
	}
	c.groups[name] = watch{group: group, fields: fg}
	return nil
}

func (c *goDCGM) Latest(entities []Entity, fields []uint16) ([]Value, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.ready {
		return nil, errNotConnected
	}
	if len(entities) == 0 || len(fields) == 0 {
		return nil, nil
	}
	pairs := make([]dcgm.GroupEntityPair, len(entities))
	for i, e := range entities {
		pairs[i] = dcgm.GroupEntityPair{EntityGroupId: toGroup(e.Group), EntityId: e.ID}
	}
	ids := make([]dcgm.Short, len(fields))
	for i, f := range fields {
		ids[i] = dcgm.Short(f)
	}
	vals, err := dcgm.EntitiesGetLatestValues(pairs, ids, 0)
	if err != nil {
		return nil, classify(err)
	}
	out := make([]Value, 0, len(vals))
	for _, v := range vals {
		x := Value{Entity: Entity{Group: fromGroup(v.EntityGroupId), ID: v.EntityID}, Field: uint16(v.FieldID)}
		switch {
		case v.Status != dcgm.DCGM_ST_OK:
			x.Blank = true
		case v.FieldType == dcgm.DCGM_FT_INT64:
			n := v.Int64()
			x.Value, x.Blank = float64(n), n >= int64Blank
		case v.FieldType == dcgm.DCGM_FT_DOUBLE:
			f := v.Float64()
			x.Value, x.Blank = f, f >= fp64Blank || math.IsNaN(f)
		default:
			x.Blank = true
		}
		out = append(out, x)
	}
	return out, nil
}

func toGroup(g EntityGroup) dcgm.Field_Entity_Group {
	if g == GroupGPUInstance {
		return dcgm.FE_GPU_I
	}
	return dcgm.FE_GPU
}

func fromGroup(g dcgm.Field_Entity_Group) EntityGroup {
	if g == dcgm.FE_GPU_I {
		return GroupGPUInstance
	}
	return GroupGPU
}

// classify marks a lost hostengine connection as ErrConnectionLost.
func classify(err error) error {
	var de *dcgm.Error
	if errors.As(err, &de) && int(de.Code) == dcgm.DCGM_ST_CONNECTION_NOT_VALID {
		return fmt.Errorf("%w (%v)", ErrConnectionLost, err)
	}
	msg := strings.ToLower(err.Error())
	if strings.Contains(msg, "connection") && (strings.Contains(msg, "not valid") || strings.Contains(msg, "invalid")) {
		return fmt.Errorf("%w (%v)", ErrConnectionLost, err)
	}
	return err
}
