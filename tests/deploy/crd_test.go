package deploy

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"k8s.io/apiextensions-apiserver/pkg/apis/apiextensions"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	structuralschema "k8s.io/apiextensions-apiserver/pkg/apiserver/schema"
	"k8s.io/apiextensions-apiserver/pkg/apiserver/schema/cel"
	"k8s.io/apiextensions-apiserver/pkg/apiserver/schema/pruning"
	"k8s.io/apiextensions-apiserver/pkg/apiserver/validation"
	kjsonutil "k8s.io/apimachinery/pkg/util/json"
	celconfig "k8s.io/apiserver/pkg/apis/cel"
	"sigs.k8s.io/yaml"
)

// KEDA's published ScaledObject schema is the CRD in its Go module. The
// module's Go packages are not imported (they bring controller-runtime and
// move Helm's dependencies); the go command fetches the module from the
// module proxy into its cache, the same source as every other dependency.
const (
	kedaModule  = "github.com/kedacore/keda/v2"
	kedaVersion = "v2.21.0"
	kedaCRDFile = "config/crd/bases/keda.sh_scaledobjects.yaml"
)

// kedaScaledObjectCRD returns KEDA's ScaledObject CRD, or skips when the go
// command cannot fetch the module (no module proxy).
func kedaScaledObjectCRD(t *testing.T) []byte {
	t.Helper()
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skipf("the go command is not on PATH: KEDA's CRD (%s@%s) cannot be fetched", kedaModule, kedaVersion)
	}
	// Outside any module, so the download touches no go.mod.
	cmd := exec.Command(goBin, "mod", "download", "-json", kedaModule+"@"+kedaVersion)
	cmd.Dir = t.TempDir()
	cmd.Env = append(os.Environ(), "GOFLAGS=")
	out, err := cmd.Output()
	var res struct{ Dir, Error string }
	_ = json.Unmarshal(out, &res)
	if err != nil || res.Dir == "" {
		t.Skipf("go mod download %s@%s failed (module proxy unreachable?): %v %s: KEDA schema checks skipped", kedaModule, kedaVersion, err, res.Error)
	}
	b, err := os.ReadFile(filepath.Join(res.Dir, kedaCRDFile))
	if err != nil {
		t.Fatalf("KEDA %s: %v", kedaVersion, err)
	}
	return b
}

// crdValidator validates custom resources as the API server does for a CRD
// version: unknown fields (what strict field validation reports, found by
// the API server's pruning), the OpenAPI schema and its CEL rules.
type crdValidator struct {
	kind       string
	structural *structuralschema.Structural
	schema     validation.SchemaValidator
	cel        *cel.Validator
}

func newCRDValidator(crdYAML []byte, version string) (*crdValidator, error) {
	js, err := yaml.YAMLToJSONStrict(crdYAML)
	if err != nil {
		return nil, err
	}
	var crd apiextensionsv1.CustomResourceDefinition
	if err := json.Unmarshal(js, &crd); err != nil {
		return nil, err
	}
	for _, v := range crd.Spec.Versions {
		if v.Name != version || v.Schema == nil || v.Schema.OpenAPIV3Schema == nil {
			continue
		}
		var internal apiextensions.JSONSchemaProps
		if err := apiextensionsv1.Convert_v1_JSONSchemaProps_To_apiextensions_JSONSchemaProps(v.Schema.OpenAPIV3Schema, &internal, nil); err != nil {
			return nil, err
		}
		ss, err := structuralschema.NewStructural(&internal)
		if err != nil {
			return nil, fmt.Errorf("%s: not a structural schema: %w", crd.Name, err)
		}
		sv, _, err := validation.NewSchemaValidator(&internal)
		if err != nil {
			return nil, err
		}
		return &crdValidator{kind: crd.Spec.Names.Kind, structural: ss, schema: sv, cel: cel.NewValidator(ss, true, celconfig.PerCallLimit)}, nil
	}
	return nil, fmt.Errorf("CRD %s has no version %s with a schema", crd.Name, version)
}

// validate returns every problem the API server would report for the
// object's YAML, with strict field validation.
func (v *crdValidator) validate(objYAML string) []string {
	js, err := yaml.YAMLToJSONStrict([]byte(objYAML))
	if err != nil {
		return []string{err.Error()}
	}
	// As the API server decodes: integers stay int64.
	var obj map[string]any
	if err := kjsonutil.Unmarshal(js, &obj); err != nil {
		return []string{err.Error()}
	}
	if obj["kind"] != v.kind {
		return []string{fmt.Sprintf("kind %v, want %s", obj["kind"], v.kind)}
	}
	var out []string
	var pruned map[string]any
	_ = kjsonutil.Unmarshal(js, &pruned)
	for _, p := range pruning.PruneWithOptions(pruned, v.structural, true, structuralschema.UnknownFieldPathOptions{TrackUnknownFieldPaths: true}) {
		out = append(out, "unknown field "+p)
	}
	for _, e := range validation.ValidateCustomResource(nil, obj, v.schema) {
		out = append(out, e.Error())
	}
	if v.cel != nil {
		errs, _ := v.cel.Validate(context.Background(), nil, v.structural, obj, nil, celconfig.RuntimeCELCostBudget)
		for _, e := range errs {
			out = append(out, e.Error())
		}
	}
	return out
}

// TestCRDValidatorRejects proves the KEDA schema check is not vacuous: each
// broken variant of a valid ScaledObject must fail.
func TestCRDValidatorRejects(t *testing.T) {
	v, err := newCRDValidator(kedaScaledObjectCRD(t), "v1alpha1")
	if err != nil {
		t.Fatal(err)
	}
	const valid = "apiVersion: keda.sh/v1alpha1\nkind: ScaledObject\nmetadata: {name: x}\nspec:\n  scaleTargetRef: {name: x}\n  minReplicaCount: 0\n  maxReplicaCount: 2\n  triggers:\n  - type: prometheus\n    metadata: {serverAddress: 'http://p:9090', query: 'vector(1)', threshold: '1'}\n"
	if p := v.validate(valid); len(p) > 0 {
		t.Fatalf("a valid ScaledObject was rejected: %v", p)
	}
	for _, tc := range []struct{ name, old, new, want string }{
		{"unknown field", "maxReplicaCount: 2", "maxReplicaCount: 2\n  pollInterval: 5", "unknown field spec.pollInterval"},
		{"metadata value not a string", "threshold: '1'", "threshold: 1", "spec.triggers[0].metadata.threshold"},
		{"minimum", "maxReplicaCount: 2", "maxReplicaCount: 0", "spec.maxReplicaCount"},
		{"required field", "scaleTargetRef: {name: x}", "scaleTargetRef: {kind: Deployment}", "spec.scaleTargetRef.name"},
		{"CEL rule min <= max", "minReplicaCount: 0", "minReplicaCount: 3", "minReplicaCount must be less than or equal to maxReplicaCount"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bad := strings.Replace(valid, tc.old, tc.new, 1)
			p := v.validate(bad)
			if !strings.Contains(strings.Join(p, "\n"), tc.want) {
				t.Errorf("want a problem naming %q, got %v", tc.want, p)
			}
		})
	}
}
