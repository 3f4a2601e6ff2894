package ForkServer::Process::Environment;
use strict;
use warnings;

use lib ();

=head1 NAME

ForkServer::Process::Environment - a vassal's C<env> and C<chdir>, applied as uWSGI applies them

=head1 SYNOPSIS

  ForkServer::Process::Environment::apply_env($config);    # env = K=V into %ENV (PERL5LIB into @INC too)
  ForkServer::Process::Environment::apply_chdir($config);  # chdir = DIR

=head1 DESCRIPTION

uWSGI applies C<env> and C<chdir> before its Perl interpreter starts and
loads the app, so a vassal file's C<env = PERL5LIB=/srv/app/lib> puts that
directory in C<@INC>, and the app finds its C<%ENV> and working directory
already set while it loads. Our vassal program is Perl already running when
its configuration arrives (over the Emperor's config pipe), so it does by
hand what Perl would have done at start-up. Used by every vassal before its
app loads (L<ForkServer::Vassal/configure>) and by a base before its
C<early-psgi> loads.

=head2 apply_env($config)

Sets every C<env> pair in C<%ENV>, in order (a later one wins). A
C<PERL5LIB> pair also puts its directories (colon-separated) at the front
of C<@INC>, with their version and architecture subdirectories, as Perl
does for C<PERL5LIB> at start-up (L<lib>).

=cut

sub apply_env {
    my ($config) = @_;
    for my $pair ($config->list('env')) {
        my ($key, $value) = split /=/, $pair, 2;
        $ENV{$key} = $value;
        lib->import(grep { length } split /:/, $value) if $key eq 'PERL5LIB';
    }
    return;
}

=head2 apply_chdir($config)

Changes to the C<chdir> directory, if there is one; dies with one line when
it cannot.

=cut

sub apply_chdir {
    my ($config) = @_;
    my $dir = $config->get('chdir');
    return unless defined $dir;
    chdir $dir or die "chdir '$dir': $!\n";
    return;
}

1;
