package ForkServer::Vassal::App;
use strict;
use warnings;

use Plack::Util ();

=head1 NAME

ForkServer::Vassal::App - load a PSGI file, with one-line errors

=head1 SYNOPSIS

  my $app = ForkServer::Vassal::App::load('app.psgi');   # dies "cannot load app 'app.psgi': ..."

=head1 DESCRIPTION

L<Plack::Util/load_psgi> (with L<FindBin> found again for the file when a
base loaded it for another), plus clear messages for a missing file, a file
that dies while loading and a file that does not return an app. Deliberately
loads nothing else: the base vassal calls it before any other module of
ours, so the codebase it preloads comes first.

=cut

sub load {
    my ($file) = @_;
    unless (-f $file) {
        # after a drop to a vassal's uid: say so, rather than "not found"
        die "app file '$file' " . ($!{EACCES} ? "cannot be reached by uid $> ($!)" : 'not found') . "\n";
    }
    # FindBin finds $0's directory once, when it is first loaded: in a
    # vassal forked from a base that loaded it for another app, a
    # `use lib "$FindBin::Bin/../lib"` (dancer2 gen's bin/app.psgi) would
    # name that app's lib/. Found again for this file, as plackup would.
    if (defined &FindBin::again) {
        local $0 = $file;
        FindBin::again();
    }
    my $app = eval { Plack::Util::load_psgi($file) };
    if (!$app) {
        (my $err = $@ || 'the file returned nothing') =~ s/\s+\z//;
        die "cannot load app '$file': $err\n";
    }
    die "app '$file' did not return a code reference\n"
        unless ref $app eq 'CODE' || Plack::Util::is_real_code($app) || overload::Method($app, '&{}');
    return $app;
}

1;
