# Writes one line to each output a vassal has, tagged with the query string
# (tests/test_logs.py): the log must show each whole, with the vassal's name.
use strict;
use warnings;
my $app = sub {
    my $env = shift;
    my $tag = $env->{QUERY_STRING} || 'none';
    warn "warn-$tag\n";
    print STDERR "stderr", "-", "$tag\n";    # three pieces, one line
    $env->{'psgi.errors'}->print("errors-$tag\n");
    print STDOUT "stdout-$tag\n";
    my $undef;
    my $joined = "perlwarning-$tag " . $undef;    # Perl's own warning
    system('echo', "child-$tag");                 # a program the app runs
    return [200, ['Content-Type' => 'text/plain'], ["ok $$\n"]];
};
$app;
