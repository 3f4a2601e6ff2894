use strict;
use warnings;
use Test::More tests => 1;
# Objects in globals are destroyed at exit, as under perl: each DESTROY
# leaves a file for test_prove.py to find.
package Marker {
    sub new { my ($class, $name) = @_; bless { name => $name }, $class }
    sub DESTROY {
        my $out = $ENV{PROVE_SUITE_OUT} or return;
        open(my $fh, ">", "$out/destroyed-$_[0]{name}") or return;
        close $fh;
    }
}
package Suite::Holder { our $held = Marker->new('package-global') }
our $main_global = Marker->new('main-global');
my $lexical = Marker->new('file-lexical');
ok 1, 'objects made';
