// Package dcgmbackend reads GPU telemetry through NVIDIA DCGM: embedded in
// the process (libdcgm.so.4), or from a remote nv-hostengine
// (--dcgm-address, as the GPU Operator runs it).
//
// The backend talks to DCGM only through the Client interface; the one real
// Client (NewClient, go-dcgm over cgo) is a thin adapter that refuses every
// call unless Init succeeded, because any other go-dcgm call after a failed
// Init kills the process. No DCGM library exists on the machines this
// project is built and tested on, so the backend is unit-tested against a
// fake Client only, and the real adapter only on its Init failure path.
package dcgmbackend

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
)

// EntityGroup is a DCGM entity group.
type EntityGroup uint8

// The entity groups the backend samples.
const (
	GroupGPU         EntityGroup = 1 // DCGM_FE_GPU
	GroupGPUInstance EntityGroup = 4 // DCGM_FE_GPU_I
)

// Entity is a DCGM entity: a GPU or a GPU instance (MIG).
type Entity struct {
	Group EntityGroup
	ID    uint
}

// GPU is a GPU as DCGM numbers it.
type GPU struct {
	ID   uint
	UUID string
}

// Instance is a GPU instance (a MIG device) as DCGM numbers it.
type Instance struct {
	ID            uint   // DCGM entity id
	GPUUUID       string // parent GPU
	GPUInstanceID int    // NVML's GPU instance id
}

// Value is one field value of one entity.
type Value struct {
	Entity Entity
	Field  uint16 // DCGM field id
	Value  float64
	// Blank is set when DCGM has no value (not supported, not yet
	// sampled): the field is then left out.
	Blank bool
}

// Client is the part of DCGM the backend uses.
type Client interface {
	// Connect initialises DCGM (dcgm.Init); it may be called again after
	// Disconnect or a failed Connect.
	Connect() error
	Disconnect() error
	GPUs() ([]GPU, error)
	Instances() ([]Instance, error)
	// Watch asks DCGM to sample fields of entities every interval; a new
	// Watch replaces the previous one of the same name.
	Watch(name string, entities []Entity, fields []uint16, interval time.Duration) error
	Latest(entities []Entity, fields []uint16) ([]Value, error)
}

// ErrConnectionLost is what a Client returns once the hostengine is gone
// (DCGM_ST_CONNECTION_NOT_VALID).
var ErrConnectionLost = errors.New("DCGM: connection to the host engine is no longer valid")

// Options configure the backend.
type Options struct {
	Client Client
	// Interval is DCGM's sampling period (the sampler's interval).
	Interval time.Duration
	Logger   *slog.Logger
}

// Backend samples through DCGM. It implements telemetry.Connector.
type Backend struct {
	c        Client
	interval time.Duration
	log      *slog.Logger

	mu        sync.Mutex
	connected bool
	busy      bool // a Latest call has not returned
	watched   *nvml.Inventory
	watchedOf telemetry.Mask
	byKey     map[string]entityPair // target key → entities
	entities  []Entity
	noProf    bool // profiling fields could not be watched
}

// entityPair is where a target's values come from: device-level fields
// from the GPU, per-instance fields from the GPU instance (MIG).
type entityPair struct {
	gpu, inst Entity
	mig       bool
}

// New builds the backend; Connect starts it.
func New(opts Options) *Backend {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Interval <= 0 {
		opts.Interval = time.Second
	}
	return &Backend{c: opts.Client, interval: opts.Interval, log: opts.Logger}
}

// Name implements telemetry.Backend.
func (b *Backend) Name() string { return telemetry.BackendDCGM }

// Connect implements telemetry.Connector.
func (b *Backend) Connect(context.Context) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.connected {
		return nil
	}
	if b.busy {
		return errors.New("DCGM: an earlier call has not returned")
	}
	if err := b.c.Connect(); err != nil {
		return err
	}
	b.connected, b.watched, b.byKey = true, nil, nil
	return nil
}

// Close implements telemetry.Backend.
func (b *Backend) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.connected || b.busy {
		return nil
	}
	b.connected = false
	return b.c.Disconnect()
}

// Sample implements telemetry.Backend.
func (b *Backend) Sample(ctx context.Context, req *telemetry.Request) error {
	b.mu.Lock()
	if !b.connected {
		b.mu.Unlock()
		return fmt.Errorf("%w: not connected", telemetry.ErrBackendLost)
	}
	if b.busy {
		b.mu.Unlock()
		return errors.New("DCGM: the previous round's call has not returned")
	}
	if b.watched != req.Inventory || b.watchedOf != req.Fields {
		if err := b.watch(req); err != nil {
			b.mu.Unlock()
			return b.fail(err)
		}
	}
	entities, fields, byKey := b.entities, b.fieldIDs(req.Fields), b.byKey
	b.busy = true
	b.mu.Unlock()

	type result struct {
		vals []Value
		err  error
	}
	done := make(chan result, 1)
	go func() {
		vals, err := b.c.Latest(entities, fields)
		b.mu.Lock()
		b.busy = false
		b.mu.Unlock()
		done <- result{vals, err}
	}()
	var r result
	select {
	case r = <-done:
	case <-ctx.Done():
		for i := range req.Out {
			req.Out[i].Err = telemetry.ErrTimeout
		}
		return nil
	}
	if r.err != nil {
		return b.fail(r.err)
	}
	b.fill(req, byKey, r.vals)
	return nil
}

// fail turns a lost connection into telemetry.ErrBackendLost, after
// disconnecting so that Connect starts afresh.
func (b *Backend) fail(err error) error {
	if !errors.Is(err, ErrConnectionLost) {
		return err
	}
	b.mu.Lock()
	wasConnected := b.connected
	b.connected = false
	b.mu.Unlock()
	if wasConnected {
		_ = b.c.Disconnect()
	}
	return fmt.Errorf("%w: %v", telemetry.ErrBackendLost, err)
}

// watch maps the targets to DCGM entities and watches the fields. Called
// with b.mu held.
func (b *Backend) watch(req *telemetry.Request) error {
	gpus, err := b.c.GPUs()
	if err != nil {
		return fmt.Errorf("DCGM: listing GPUs: %w", err)
	}
	gpuByUUID := map[string]uint{}
	for _, g := range gpus {
		gpuByUUID[g.UUID] = g.ID
	}
	type giKey struct {
		gpu string
		gi  int
	}
	instByKey := map[giKey]uint{}
	needMIG := false
	for _, t := range req.Targets {
		needMIG = needMIG || t.MIG != nil
	}
	if needMIG {
		insts, err := b.c.Instances()
		if err != nil {
			return fmt.Errorf("DCGM: listing GPU instances: %w", err)
		}
		for _, in := range insts {
			instByKey[giKey{in.GPUUUID, in.GPUInstanceID}] = in.ID
		}
	}
	b.byKey = map[string]entityPair{}
	b.entities = nil
	seen := map[Entity]bool{}
	add := func(e Entity) {
		if !seen[e] {
			seen[e] = true
			b.entities = append(b.entities, e)
		}
	}
	for _, t := range req.Targets {
		id, ok := gpuByUUID[t.GPU.UUID]
		if !ok {
			continue // reported as unknown to DCGM in fill
		}
		p := entityPair{gpu: Entity{GroupGPU, id}}
		add(p.gpu)
		if t.MIG != nil {
			gi, ok := instByKey[giKey{t.GPU.UUID, t.MIG.GPUInstanceID}]
			if !ok {
				continue
			}
			p.inst, p.mig = Entity{GroupGPUInstance, gi}, true
			add(p.inst)
		}
		b.byKey[t.Key] = p
	}
	var plain, prof []uint16
	for f := range telemetry.NumFields {
		if !req.Fields.Has(f) || f == telemetry.DriverVersion {
			continue
		}
		if isProf(f) {
			prof = append(prof, f.Info().ID)
		} else {
			plain = append(plain, f.Info().ID)
		}
	}
	if len(b.entities) > 0 {
		if err := b.c.Watch("gpu-plugin", b.entities, plain, b.interval); err != nil {
			return fmt.Errorf("DCGM: watching fields: %w", err)
		}
		b.noProf = false
		if len(prof) > 0 {
			// Profiling needs DCGM's profiling module, a datacenter GPU
			// and privileges; without them the fields are left out.
			if err := b.c.Watch("gpu-plugin-prof", b.entities, prof, b.interval); err != nil {
				if errors.Is(err, ErrConnectionLost) {
					return err
				}
				b.noProf = true
				b.log.Info("DCGM profiling fields unavailable; DCGM_FI_PROF_* are left out", "reason", err.Error())
			}
		}
	}
	b.watched, b.watchedOf = req.Inventory, req.Fields
	return nil
}

// fieldIDs lists the DCGM field ids to read. Called with b.mu held.
func (b *Backend) fieldIDs(fields telemetry.Mask) []uint16 {
	var ids []uint16
	for f := range telemetry.NumFields {
		if fields.Has(f) && f != telemetry.DriverVersion && !(b.noProf && isProf(f)) {
			ids = append(ids, f.Info().ID)
		}
	}
	return ids
}

func isProf(f telemetry.Field) bool { return f.Info().ID >= 1001 && f.Info().ID <= 1099 }

// fill distributes DCGM's values to the targets: device-level fields from
// the GPU entity, per-instance fields from the GPU instance; utilization is
// not served for MIG devices.
func (b *Backend) fill(req *telemetry.Request, byKey map[string]entityPair, vals []Value) {
	byEntity := map[Entity]*telemetry.Values{}
	for _, v := range vals {
		if v.Blank {
			continue
		}
		f, ok := fieldByID[v.Field]
		if !ok || !req.Fields.Has(f) {
			continue
		}
		dst := byEntity[v.Entity]
		if dst == nil {
			dst = &telemetry.Values{}
			byEntity[v.Entity] = dst
		}
		dst.Set(f, v.Value)
	}
	for i, t := range req.Targets {
		p, ok := byKey[t.Key]
		if !ok {
			req.Out[i].Err = fmt.Errorf("DCGM does not know %s", t.Key)
			continue
		}
		gv := byEntity[p.gpu]
		var iv *telemetry.Values
		if p.mig {
			iv = byEntity[p.inst]
		}
		out := &req.Out[i].Values
		for f := range telemetry.NumFields {
			src := gv
			switch f.Info().Scope {
			case telemetry.ScopeWholeGPU:
				if p.mig {
					continue
				}
			case telemetry.ScopeInstance:
				if p.mig {
					src = iv
				}
			}
			if src == nil {
				continue
			}
			if x, ok := src.Get(f); ok {
				out.Set(f, x)
			}
		}
	}
}

var fieldByID = func() map[uint16]telemetry.Field {
	m := map[uint16]telemetry.Field{}
	for f := range telemetry.NumFields {
		m[f.Info().ID] = f
	}
	return m
}()
