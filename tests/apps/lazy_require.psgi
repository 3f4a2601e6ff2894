# An app that `require`s a module of its own on the first request to a
# path, as a template engine requires its parser: each answer says which of
# those modules this process had before the request (1) or not (0), so a
# test sees what its base preloaded.
use strict;
use warnings;
use File::Basename ();
use File::Spec ();
use lib File::Spec->rel2abs(File::Basename::dirname(__FILE__)) . '/lib';

my %lazy = (
    '/'       => 'LazyLearned::Used',
    '/tenant' => 'LazyLearned::Tenant',
    '/dies'   => 'LazyLearned::DiesInBase',
);

sub file_of { (my $f = "$_[0].pm") =~ s{::}{/}g; $f }

my $app = sub {
    my ($env) = @_;
    my $had = join ' ', map { "$_=" . ($INC{ file_of($_) } ? 1 : 0) } sort values %lazy;
    my $module = $lazy{ $env->{PATH_INFO} }
        // return [404, ['Content-Type' => 'text/plain'], ["no such path\n"]];
    require(file_of($module));
    return [200, ['Content-Type' => 'text/plain'], ["pid=$$ $had loaded=" . $module->loaded . "\n"]];
};
$app;
