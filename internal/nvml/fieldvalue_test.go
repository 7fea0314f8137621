package nvml

// FieldValue on value types the simulator does not produce. Its callers
// (the telemetry backend, the recovery gate) are tested end to end on
// simulated nodes and the fake library.

import (
	"encoding/binary"
	"math"
	"testing"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
)

// TestFieldValueTypes: every NVML value type decodes; a per-field error
// or an unknown type is NOT_SUPPORTED, never a zero.
func TestFieldValueTypes(t *testing.T) {
	put := func(typ gonvml.ValueType, write func(b []byte)) gonvml.FieldValue {
		fv := gonvml.FieldValue{ValueType: uint32(typ)}
		write(fv.Value[:])
		return fv
	}
	for _, tc := range []struct {
		name string
		fv   gonvml.FieldValue
		want float64
		ret  gonvml.Return
	}{
		{"double", put(gonvml.VALUE_TYPE_DOUBLE, func(b []byte) { binary.NativeEndian.PutUint64(b, math.Float64bits(71.5)) }), 71.5, gonvml.SUCCESS},
		{"unsigned int", put(gonvml.VALUE_TYPE_UNSIGNED_INT, func(b []byte) { binary.NativeEndian.PutUint32(b, 68) }), 68, gonvml.SUCCESS},
		{"signed int", put(gonvml.VALUE_TYPE_SIGNED_INT, func(b []byte) { binary.NativeEndian.PutUint32(b, uint32(0xFFFFFFFE)) }), -2, gonvml.SUCCESS},
		{"unsigned long long", put(gonvml.VALUE_TYPE_UNSIGNED_LONG_LONG, func(b []byte) { binary.NativeEndian.PutUint64(b, 1<<40) }), 1 << 40, gonvml.SUCCESS},
		{"signed long long", put(gonvml.VALUE_TYPE_SIGNED_LONG_LONG, func(b []byte) { binary.NativeEndian.PutUint64(b, uint64(0xFFFFFFFFFFFFFFFF)) }), -1, gonvml.SUCCESS},
		{"unsigned short", put(gonvml.VALUE_TYPE_UNSIGNED_SHORT, func(b []byte) { binary.NativeEndian.PutUint16(b, 7) }), 7, gonvml.SUCCESS},
		{"field not supported", gonvml.FieldValue{NvmlReturn: uint32(gonvml.ERROR_NOT_SUPPORTED)}, 0, gonvml.ERROR_NOT_SUPPORTED},
		{"unknown type", gonvml.FieldValue{ValueType: 99}, 0, gonvml.ERROR_NOT_SUPPORTED},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := &mock.Device{GetFieldValuesFunc: func(v []gonvml.FieldValue) gonvml.Return {
				id := v[0].FieldId
				v[0] = tc.fv
				v[0].FieldId = id
				return gonvml.SUCCESS
			}}
			got, ret := FieldValue(d, gonvml.FI_DEV_MEMORY_TEMP)
			if got != tc.want || ret != tc.ret {
				t.Errorf("got %v %v, want %v %v", got, ret, tc.want, tc.ret)
			}
			if f := d.GetFieldValuesCalls(); len(f) != 1 || f[0].FieldValues[0].FieldId != gonvml.FI_DEV_MEMORY_TEMP {
				t.Errorf("asked for %+v, want FI_DEV_MEMORY_TEMP", f)
			}
		})
	}
}
