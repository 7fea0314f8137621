package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"sort"
	"strconv"
	"strings"
)

// FieldError is a config file error that names the field at fault by its
// path, e.g. "sharing.timeSlicing.resources[1].replicas".
type FieldError struct {
	Path string
	Msg  string
}

func (e *FieldError) Error() string {
	if e.Path == "" {
		return e.Msg
	}
	return e.Path + ": " + e.Msg
}

func fieldErr(path, format string, args ...any) error {
	return &FieldError{Path: path, Msg: fmt.Sprintf(format, args...)}
}

// joinPath appends a field name or an "[i]" index to a path.
func joinPath(path, elem string) string {
	switch {
	case path == "":
		return elem
	case strings.HasPrefix(elem, "["):
		return path + elem
	}
	return path + "." + elem
}

// shapeChecker walks the generic JSON document against the Go types of
// Config before the real decode, because encoding/json names neither the
// list index of a bad value nor the path of an unknown field.
type shapeChecker struct {
	// warnings collects unknown keys (ignored, as NVIDIA's parser ignores
	// them) and keys accepted only because encoding/json matches field names
	// without regard to case, as NVIDIA's parser does.
	warnings []string
}

var unmarshalerType = reflect.TypeFor[json.Unmarshaler]()

// check reports the first problem in v as a *FieldError.
func (s *shapeChecker) check(t reflect.Type, v any, path string) error {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if v == nil {
		return nil // null leaves the field unset, as encoding/json does
	}
	if reflect.PointerTo(t).Implements(unmarshalerType) {
		return s.custom(t, v, path)
	}
	switch t.Kind() {
	case reflect.Struct:
		m, ok := v.(map[string]any)
		if !ok {
			return wrongType(path, v, "a mapping of fields")
		}
		return s.object(t, m, path)
	case reflect.Slice:
		l, ok := v.([]any)
		if !ok {
			return wrongType(path, v, "a list")
		}
		for i, e := range l {
			if err := s.check(t.Elem(), e, joinPath(path, "["+strconv.Itoa(i)+"]")); err != nil {
				return err
			}
		}
	case reflect.String:
		if _, ok := v.(string); !ok {
			return wrongType(path, v, "a string (quote it)")
		}
	case reflect.Bool:
		if _, ok := v.(bool); !ok {
			return wrongType(path, v, "true or false")
		}
	case reflect.Int, reflect.Int64, reflect.Int32, reflect.Uint, reflect.Uint64, reflect.Uint32:
		n, ok := v.(json.Number)
		if !ok {
			return wrongType(path, v, "a whole number")
		}
		if _, err := strconv.ParseInt(n.String(), 10, 64); err != nil {
			return fieldErr(path, "%s is not a whole number", clip(n.String()))
		}
		if k := t.Kind(); (k == reflect.Uint || k == reflect.Uint64 || k == reflect.Uint32) && strings.HasPrefix(n.String(), "-") {
			return fieldErr(path, "%s is negative; want 0 or more", clip(n.String()))
		}
	}
	return nil
}

// object checks a mapping against a struct's JSON fields.
func (s *shapeChecker) object(t reflect.Type, m map[string]any, path string) error {
	fields := map[string]reflect.StructField{}
	var names []string
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name == "-" || !f.IsExported() {
			continue
		}
		if name == "" {
			name = f.Name
		}
		fields[name] = f
		names = append(names, name)
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys) // report problems in a stable order
	for _, k := range keys {
		f, ok := fields[k]
		if !ok {
			for _, n := range names {
				if strings.EqualFold(n, k) {
					f, ok = fields[n], true
					s.warnings = append(s.warnings, fmt.Sprintf("%s: accepted as %s; field names are case-sensitive in this format's documentation, so spell it %s",
						joinPath(path, k), joinPath(path, n), n))
					break
				}
			}
		}
		if !ok {
			s.warnings = append(s.warnings, unknownField(path, k, names))
			continue
		}
		if err := s.check(f.Type, m[k], joinPath(path, k)); err != nil {
			return err
		}
	}
	return nil
}

// custom hands a value to the type's own UnmarshalJSON and puts the path in
// front of its error.
func (s *shapeChecker) custom(t reflect.Type, v any, path string) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return fieldErr(path, "%v", err)
	}
	target := reflect.New(t).Interface().(json.Unmarshaler)
	err = target.UnmarshalJSON(raw)
	if err == nil {
		return nil
	}
	var fe *FieldError
	if errors.As(err, &fe) {
		return &FieldError{Path: joinPath(path, fe.Path), Msg: fe.Msg}
	}
	msg := err.Error()
	if rest, ok := strings.CutPrefix(msg, path+": "); ok {
		return fieldErr(path, "%s", rest) // the type already named itself
	}
	if strings.HasPrefix(msg, path+".") || strings.HasPrefix(msg, path+"[") {
		return errors.New(msg)
	}
	return fieldErr(path, "%s", msg)
}

// unknownField is the warning for a key the format does not have. NVIDIA's
// plugin ignores such keys, so a file written for a newer NVIDIA release
// still starts; the daemon does the same and says so.
func unknownField(path, key string, known []string) string {
	msg := "unknown field, ignored (as NVIDIA's device plugin ignores it)"
	if len(key) <= maxQuoted {
		if s := closest(key, known); s != "" {
			msg += fmt.Sprintf("; did you mean %q?", s)
		}
	}
	sort.Strings(known)
	msg += fmt.Sprintf(" Allowed here: %s (see Configuration file in docs/configuration.md)", strings.Join(known, ", "))
	return joinPath(path, clip(key)) + ": " + msg
}

func wrongType(path string, v any, want string) error {
	return fieldErr(path, "wrong type: got %s, want %s", describe(v), want)
}

// describe names a generic JSON value for an error message.
func describe(v any) string {
	switch x := v.(type) {
	case string:
		return "the string " + quote(x)
	case json.Number:
		return "the number " + clip(x.String())
	case bool:
		return fmt.Sprintf("%t", x)
	case []any:
		return "a list"
	case map[string]any:
		return "a mapping"
	}
	return fmt.Sprintf("%v", v)
}

// closest suggests the known name nearest to key, if it is close enough to
// be a typo.
func closest(key string, known []string) string {
	best, bestD := "", 3
	for _, k := range known {
		if d := editDistance(strings.ToLower(key), strings.ToLower(k)); d < bestD {
			best, bestD = k, d
		}
	}
	return best
}

// editDistance is the Levenshtein distance.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// decodeGeneric reads JSON into maps, lists and json.Numbers.
func decodeGeneric(js []byte) (any, error) {
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.UseNumber()
	var doc any
	if err := dec.Decode(&doc); err != nil {
		return nil, err
	}
	return doc, nil
}
