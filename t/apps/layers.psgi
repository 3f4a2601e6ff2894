# An app that puts PerlIO layers on the standard handles, as Catalyst's
# setup and `use open qw(:std :encoding(UTF-8))` do: at load time, and
# again inside a request.
use strict;
use warnings;
use open qw(:std :encoding(UTF-8));

binmode STDERR, ':encoding(UTF-8)';
print STDERR "loaded caf\x{e9} \x{2603}\n";

sub {
    my ($env) = @_;
    if ($env->{PATH_INFO} eq '/layer') {
        binmode STDOUT, ':encoding(UTF-8)';
        binmode STDERR, ':utf8';
        print STDERR "request caf\x{e9} \x{2603}\n";
        print STDOUT "stdout caf\x{e9} \x{2603}\n";
    }
    return [200, ['Content-Type' => 'text/plain'], ["layers $$\n"]];
};
