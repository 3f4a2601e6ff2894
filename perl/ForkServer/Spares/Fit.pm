package ForkServer::Spares::Fit;
use strict;
use warnings;

use Cwd ();
use ForkServer::Vassal::Identity ();

=head1 NAME

ForkServer::Spares::Fit - whether a spare's warm worker may serve the vassal it is given

=head1 SYNOPSIS

  my $why = ForkServer::Spares::Fit::unfit_for(\%warm_up_record, $config);    # undef: it fits
  my $why = ForkServer::Spares::Fit::unfit_for(\%warm_up_record, $config, solo => 1);
      # may it be the vassal's one process itself (master = false)

=head1 DESCRIPTION

A warm worker's warm-up ran before it knew its vassal, with the base's
C<%ENV>, directory and identity. It may serve only a vassal whose process
runs as its warm-up ran: the same uid, gid and groups
(L<ForkServer::Vassal::Identity>), the same working directory (after
C<chdir>), the same value for every C<%ENV> key the warm-up read
(C<UWSGI_*> aside: the vassal's own are set after), and no C<keep-fd> (the
worker holds none of the base's descriptors). A vassal without a master has
no worker: unfit, unless C<solo> asks whether the worker may be that
vassal's one process. Called once C<env> and C<chdir> are applied; the
reason when it does not fit.

=cut

sub unfit_for {
    my ($warm, $config, %how) = @_;
    $warm or return 'no warm-up known';
    # no worker at all: the spare's own process serves (unless the worker
    # judges whether it may be the vassal itself)
    return 'master = false' unless $config->get('master') || $how{solo};
    return 'keep-fd' if $config->list('keep-fd');
    # where the config changes neither, the identity and directory the
    # waiting worker saw before it waited (waiting changes neither)
    my $now = $warm->{now} || {};
    my $id = ForkServer::Vassal::Identity::target($config) // $now->{id} // ForkServer::Vassal::Identity::current();
    return 'another identity' unless ForkServer::Vassal::Identity::same($id, $warm->{id});
    my $cwd = defined $config->get('chdir') ? Cwd::getcwd() : $now->{cwd} // Cwd::getcwd();
    return 'another working directory' unless ($cwd // '') eq ($warm->{cwd} // '');
    for my $key (keys %{ $warm->{env} }) {
        next if $key =~ /\AUWSGI_/;
        my ($was, $is) = ($warm->{env}{$key}, $ENV{$key});
        next if !defined $was && !defined $is;
        return "another $key" if !defined $was || !defined $is || $was ne $is;
    }
    return undef;
}

1;
