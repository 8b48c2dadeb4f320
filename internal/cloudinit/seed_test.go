package cloudinit

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

func TestSeedImage(t *testing.T) {
	dir := t.TempDir()
	s := Seed{
		UserData:      []byte("#cloud-config\npassword: s3cret-from-a-secret\n"),
		MetaData:      []byte("local-hostname: from-meta\n"),
		NetworkConfig: []byte("version: 2\nethernets: {}\n"),
		Hostname:      "web-1",
		SSHKeys:       []string{"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB test@swarmvm"},
	}
	path := filepath.Join(dir, "cidata.iso")
	if err := Build(path, dir, s); err != nil {
		t.Fatal(err)
	}
	img, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	// The primary volume descriptor (sector 16) names the volume CIDATA,
	// which NoCloud looks for; a Joliet supplementary one follows.
	if id := strings.TrimRight(string(img[16*2048+40:16*2048+72]), " \x00"); id != "CIDATA" {
		t.Errorf("volume identifier %q, want CIDATA", id)
	}
	if img[17*2048] != 2 && img[18*2048] != 2 {
		t.Error("no supplementary (Joliet) volume descriptor")
	}
	if !bytes.Contains(img, []byte("PX")) || !bytes.Contains(img, []byte("NM")) {
		t.Error("no Rock Ridge entries")
	}
	files, err := Read(path)
	if err != nil {
		t.Fatal(err)
	}
	if string(files["user-data"]) != string(s.UserData) || string(files["network-config"]) != string(s.NetworkConfig) {
		t.Errorf("files %v", keys(files))
	}
	var meta map[string]any
	if err := yaml.Unmarshal(files["meta-data"], &meta); err != nil {
		t.Fatal(err)
	}
	if meta["local-hostname"] != "from-meta" || meta["instance-id"] != s.InstanceID() || len(meta["public-keys"].([]any)) != 1 {
		t.Errorf("meta-data %v", meta)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("staging left in %s: %v", dir, entries)
	}
	if err := Build(path, dir, s); err == nil {
		t.Error("Build replaced an existing file")
	}
}

func keys(m map[string][]byte) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// A change to any input gives a new instance-id, so cloud-init runs again;
// the same inputs give the same one, so a reboot does not.
func TestInstanceID(t *testing.T) {
	base := Seed{UserData: []byte("#cloud-config\n"), Hostname: "a", SSHKeys: []string{"k1"}}
	same := base
	if base.InstanceID() != same.InstanceID() {
		t.Error("same inputs, different instance-id")
	}
	for name, mod := range map[string]func(*Seed){
		"user-data": func(s *Seed) { s.UserData = []byte("#cloud-config\npackages: [htop]\n") },
		"meta-data": func(s *Seed) { s.MetaData = []byte("x: 1\n") },
		"network":   func(s *Seed) { s.NetworkConfig = []byte("version: 2\n") },
		"hostname":  func(s *Seed) { s.Hostname = "b" },
		"keys":      func(s *Seed) { s.SSHKeys = []string{"k2"} },
		"moved":     func(s *Seed) { s.UserData, s.MetaData = nil, []byte("#cloud-config\n") },
	} {
		c := base
		mod(&c)
		if c.InstanceID() == base.InstanceID() {
			t.Errorf("%s changed, instance-id did not", name)
		}
	}
	// meta-data's own instance-id wins.
	files, _ := Seed{MetaData: []byte("instance-id: mine\n")}.Files()
	if !strings.Contains(string(files["meta-data"]), "instance-id: mine") {
		t.Errorf("meta-data %s", files["meta-data"])
	}
}

// The instance-id is keyed: the unkeyed digest of the seed (which a reader
// of the id could test guessed passwords against) is not it; one key gives
// one id for one seed, and a change of the seed or of the key another.
func TestInstanceIDKeyed(t *testing.T) {
	s := Seed{UserData: []byte("#cloud-config\npassword: 123456\n"), Hostname: "vm"}
	unkeyed := s.InstanceID()
	k1, k2 := bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 32)
	s.Key = k1
	a := s.InstanceID()
	if a == unkeyed || !strings.HasPrefix(a, "iid-swarmvm-") || len(a) != len(unkeyed) {
		t.Errorf("keyed %q, unkeyed %q", a, unkeyed)
	}
	if s.InstanceID() != a {
		t.Error("one key, one seed: two ids")
	}
	s.Key = k2
	if s.InstanceID() == a {
		t.Error("another key gave the same id")
	}
	s.Key = k1
	s.UserData = []byte("#cloud-config\npassword: 123457\n")
	if s.InstanceID() == a {
		t.Error("another seed gave the same id")
	}
	// The attack: every 6-digit password tried against the id finds none
	// without the key (a sample of them, the true one among them).
	s.UserData = []byte("#cloud-config\npassword: 123456\n")
	id := s.InstanceID()
	for _, guess := range []string{"000000", "123455", "123456", "999999"} {
		g := Seed{UserData: []byte("#cloud-config\npassword: " + guess + "\n"), Hostname: "vm"}
		if g.InstanceID() == id {
			t.Errorf("the keyed id matched the unkeyed digest of %q", guess)
		}
	}
}
