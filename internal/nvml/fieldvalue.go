package nvml

import (
	"encoding/binary"
	"math"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
)

// FieldValue reads one NVML field value as a number, whatever its value
// type. A field the driver does not know answers in the value's own return
// code; a value type no numeric field has is NOT_SUPPORTED.
func FieldValue(h gonvml.Device, id uint32) (float64, gonvml.Return) {
	fv := []gonvml.FieldValue{{FieldId: id}}
	if ret := h.GetFieldValues(fv); ret != gonvml.SUCCESS {
		return 0, ret
	}
	return DecodeFieldValue(&fv[0])
}

// DecodeFieldValue reads one value that nvmlDeviceGetFieldValues filled in
// (for callers that ask for several fields, or a scopeId, in one call): its
// own return code, else its number whatever its value type; a value type no
// numeric field has is NOT_SUPPORTED.
func DecodeFieldValue(fv *gonvml.FieldValue) (float64, gonvml.Return) {
	if ret := gonvml.Return(fv.NvmlReturn); ret != gonvml.SUCCESS {
		return 0, ret
	}
	raw := fv.Value[:]
	switch gonvml.ValueType(fv.ValueType) {
	case gonvml.VALUE_TYPE_DOUBLE:
		return math.Float64frombits(binary.NativeEndian.Uint64(raw)), gonvml.SUCCESS
	case gonvml.VALUE_TYPE_UNSIGNED_INT:
		return float64(binary.NativeEndian.Uint32(raw)), gonvml.SUCCESS
	case gonvml.VALUE_TYPE_SIGNED_INT:
		return float64(int32(binary.NativeEndian.Uint32(raw))), gonvml.SUCCESS
	case gonvml.VALUE_TYPE_UNSIGNED_LONG, gonvml.VALUE_TYPE_UNSIGNED_LONG_LONG:
		return float64(binary.NativeEndian.Uint64(raw)), gonvml.SUCCESS
	case gonvml.VALUE_TYPE_SIGNED_LONG_LONG:
		return float64(int64(binary.NativeEndian.Uint64(raw))), gonvml.SUCCESS
	case gonvml.VALUE_TYPE_UNSIGNED_SHORT:
		return float64(binary.NativeEndian.Uint16(raw)), gonvml.SUCCESS
	}
	return 0, gonvml.ERROR_NOT_SUPPORTED
}
