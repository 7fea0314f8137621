package deploy

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"unicode"
)

// TestDocsLinks: every relative link in README.md and docs/*.md names a file
// that exists and, for a Markdown file, a heading (or <a id>) that is there.
func TestDocsLinks(t *testing.T) {
	root := RepoRoot()
	pages, err := filepath.Glob(filepath.Join(root, "docs", "*.md"))
	if err != nil {
		t.Fatal(err)
	}
	pages = append([]string{filepath.Join(root, ReadmePath)}, pages...)
	checked := 0
	for _, page := range pages {
		problems, n := brokenLinks(t, page)
		checked += n
		for _, p := range problems {
			t.Error(p)
		}
	}
	if checked < 50 {
		t.Errorf("only %d relative links checked in %d pages: is the link parser broken?", checked, len(pages))
	}
}

// TestBrokenLinksFound: the checker above finds a missing file, a missing
// anchor and a missing anchor in another page, and accepts good links.
func TestBrokenLinksFound(t *testing.T) {
	dir := t.TempDir()
	write := func(name, text string) string {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	write("docs/b.md", "# B page\n\n## HTTP endpoints (`--metrics-address`, default `:9400`)\n\n<a id=\"suite-a\"></a>\n")
	a := write("README.md", strings.Join([]string{
		"# A", "## Two commands", "```sh", "# not a heading", "```",
		"[ok](#two-commands) [ok](docs/b.md#http-endpoints---metrics-address-default-9400) [ok](docs/b.md#suite-a)",
		"[ok](https://example.com/#x) `[code](#not-checked)` [ok](docs/b.md)",
		"[bad](#not-a-heading) [bad](docs/c.md) [bad](docs/b.md#b) [bad](#not-a-heading-1)",
	}, "\n"))
	problems, n := brokenLinks(t, a)
	if n != 8 {
		t.Errorf("checked %d links, want 8", n)
	}
	var got []string
	for _, p := range problems {
		got = append(got, p[strings.LastIndex(p, ": ")+2:])
	}
	want := []string{"#not-a-heading", "docs/c.md", "docs/b.md#b", "#not-a-heading-1"}
	if !slices.Equal(got, want) {
		t.Errorf("broken links found: %q, want %q\n%s", got, want, strings.Join(problems, "\n"))
	}
}

var (
	mdLink      = regexp.MustCompile(`\[[^\]]*\]\(([^)\s]+)\)`)
	codeSpan    = regexp.MustCompile("`[^`]*`")
	htmlAnchor  = regexp.MustCompile(`<a (?:id|name)="([^"]+)"`)
	heading     = regexp.MustCompile(`^#{1,6} (.*)$`)
	absoluteURL = regexp.MustCompile(`^[a-z]+:`)
)

// brokenLinks returns one line per broken relative link of a Markdown file,
// and how many relative links it checked.
func brokenLinks(t *testing.T, page string) ([]string, int) {
	t.Helper()
	links, _ := parseMarkdown(t, page)
	var problems []string
	checked := 0
	for _, l := range links {
		if absoluteURL.MatchString(l.target) {
			continue
		}
		checked++
		path, frag, _ := strings.Cut(l.target, "#")
		target := page
		if path != "" {
			target = filepath.Join(filepath.Dir(page), path)
		}
		if _, err := os.Stat(target); err != nil {
			problems = append(problems, l.where+": no such file: "+l.target)
			continue
		}
		if frag == "" || !strings.HasSuffix(target, ".md") {
			continue
		}
		if _, anchors := parseMarkdown(t, target); !anchors[frag] {
			problems = append(problems, l.where+": no such anchor: "+l.target)
		}
	}
	return problems, checked
}

type mdLinkRef struct{ where, target string }

// parseMarkdown returns a Markdown file's links (outside code) and its
// anchors: GitHub's heading IDs (a repeated heading gets -1, -2, …) and
// <a id> or <a name> tags.
func parseMarkdown(t *testing.T, path string) ([]mdLinkRef, map[string]bool) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var links []mdLinkRef
	anchors, seen := map[string]bool{}, map[string]int{}
	fence := false
	for i, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "```") {
			fence = !fence
			continue
		}
		if fence {
			continue
		}
		if m := heading.FindStringSubmatch(line); m != nil {
			id := headingID(m[1])
			if n := seen[id]; n > 0 {
				anchors[id+"-"+strconv.Itoa(n)] = true
			} else {
				anchors[id] = true
			}
			seen[id]++
		}
		for _, m := range htmlAnchor.FindAllStringSubmatch(line, -1) {
			anchors[m[1]] = true
		}
		for _, m := range mdLink.FindAllStringSubmatch(codeSpan.ReplaceAllString(line, ""), -1) {
			links = append(links, mdLinkRef{where: filepath.Base(path) + ":" + strconv.Itoa(i+1), target: m[1]})
		}
	}
	return links, anchors
}

// headingID is GitHub's ID for a heading: lower case, letters, digits, '-'
// and '_' kept, spaces made '-', everything else dropped.
func headingID(h string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(strings.TrimSpace(h)) {
		switch {
		case unicode.IsLetter(r) || unicode.IsDigit(r) || r == '-' || r == '_':
			b.WriteRune(r)
		case r == ' ':
			b.WriteByte('-')
		}
	}
	return b.String()
}
