package fdpass

import (
	"reflect"
	"testing"

	"github.com/swarmvm/swarmvm/internal/config"
)

// FuzzDecodeRequest feeds arbitrary bytes to the broker's request decoder:
// no panic, and whatever it accepts is valid and survives a round trip.
func FuzzDecodeRequest(f *testing.F) {
	f.Add([]byte(`{"version":1,"vm":"web-1","kvm":true}`))
	f.Add([]byte(`{"version":1,"vm":"a","tap":{"bridge":"br0"},"vhost_net":true}`))
	f.Add([]byte(`{"version":2,"vm":"../x","kvm":true,"extra":1}`))
	f.Add([]byte(`{"version":1,"vm":"a","kvm":true} {}`))
	f.Add([]byte{0xff, 0xfe, '{'})
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := DecodeRequest(b)
		if err != nil {
			return
		}
		if r.Version != Version || !config.ValidVMName(r.VM) || (!r.KVM && r.TAP == nil) || (r.TAP != nil && !config.ValidIfName(r.TAP.Bridge)) {
			t.Fatalf("accepted an invalid request %+v", r)
		}
		again, err := Encode(r)
		if err != nil {
			t.Fatalf("re-encode: %v", err)
		}
		r2, err := DecodeRequest(again)
		if err != nil || !reflect.DeepEqual(r, r2) {
			t.Fatalf("round trip: %+v -> %+v, %v", r, r2, err)
		}
	})
}
