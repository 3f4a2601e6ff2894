# An app with lazy state (warm-up tests): every call is counted and its path
# recorded, in the process that made it. GET /state answers what this
# process saw before: an adopted vassal forked after the base's warm-up sees
# the base's calls. /fh, /delayed and /stream answer with a filehandle body,
# a delayed response and a streaming writer; /dies dies.
use strict;
use warnings;
my @seen;    # "PATH(pid)" per call
my $app = sub {
    my $env = shift;
    my $path = $env->{PATH_INFO};
    my $state = join ',', @seen;
    push @seen, "$path($$)";
    die "warm-up trouble\non two lines\n" if $path eq '/dies';
    if ($path eq '/fh') {
        open my $fh, '<', \"line 1\nline 2\n" or die $!;
        return [200, ['Content-Type' => 'text/plain'], $fh];
    }
    if ($path eq '/delayed') {
        return sub { $_[0]->([202, ['Content-Type' => 'text/plain'], ['later']]) };
    }
    if ($path eq '/stream') {
        return sub {
            my $w = $_[0]->([206, ['Content-Type' => 'text/plain']]);
            $w->write("chunk $_\n") for 1 .. 3;
            $w->close;
        };
    }
    return [200, ['Content-Type' => 'text/plain'], ["pid=$$ seen=$state\n"]];
};
$app;
